//! PEFT's rules for which modules get adapters, and with which rank and alpha.

use lora_core::{DEFAULT_ADAPTER, LoraOps, Model};

use crate::config::{IntOrList, LoraConfig, StrOrList, TargetModules};
use crate::error::{PeftError, Result};
use crate::name_patterns::compile;

/// Whether `name` is selected by a `target_modules`-style rule:
/// a list entry matches the whole name or a `.`-separated suffix of it; a string is a
/// regular expression that must match the whole name; `"all-linear"` matches every
/// linear layer.
pub fn matches(rule: &TargetModules, name: &str, field: &'static str) -> Result<bool> {
    Ok(match rule {
        TargetModules::List(keys) => keys
            .iter()
            .any(|k| name == k || name.ends_with(&format!(".{k}"))),
        TargetModules::Pattern(p) if p == "all-linear" => true,
        TargetModules::Pattern(p) => compile(field, p, format!("^(?:{p})$"))?.is_match(name),
    })
}

/// PEFT's `target_modules` rule (names or a regex) as the module selection of
/// `lora quantize` ([`lora_io::quantize_checkpoint`]).
pub fn quant_targets(rule: TargetModules) -> lora_io::QuantTargets {
    lora_io::QuantTargets::Matching(Box::new(move |module| {
        matches(&rule, module, "target_modules").map_err(|e| e.to_string())
    }))
}

fn rule_text(rule: &TargetModules) -> String {
    match rule {
        TargetModules::List(l) => format!("{l:?}"),
        TargetModules::Pattern(p) => format!("{p:?}"),
    }
}

/// The layer index in `name` as PEFT finds it for `layers_to_transform`: the number after
/// the first `<pattern>.` (any segment when `layers_pattern` is empty) that is followed by
/// another `.`.
fn layer_index(name: &str, patterns: &[String]) -> Result<Option<usize>> {
    let regexes: Vec<String> = if patterns.iter().all(String::is_empty) {
        vec![r"^.*?\.[^.]*\.(\d+)\.".to_string()]
    } else {
        patterns
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| format!(r"^(?:|.*?\.){p}\.(\d+)\."))
            .collect()
    };
    for re in regexes {
        let r = compile("layers_pattern", &re, re.clone())?;
        if let Some(c) = r.captures(name) {
            return Ok(c.get(1).and_then(|m| m.as_str().parse().ok()));
        }
    }
    Ok(None)
}

/// Whether `config` selects the module `name`, exactly as PEFT's
/// `check_target_module_exists`: `exclude_modules` first; then `target_modules`; and
/// `layers_to_transform` only filters modules matched by a list entry's `.`-suffix.
pub fn selects(config: &LoraConfig, name: &str) -> Result<bool> {
    if let Some(ex) = &config.exclude_modules
        && matches(ex, name, "exclude_modules")?
    {
        return Ok(false);
    }
    let Some(targets) = &config.target_modules else {
        return Ok(false);
    };
    let keys = match targets {
        TargetModules::Pattern(_) => return matches(targets, name, "target_modules"),
        TargetModules::List(keys) => keys,
    };
    if keys.iter().any(|k| k == name) {
        return Ok(true);
    }
    if !keys.iter().any(|k| name.ends_with(&format!(".{k}"))) {
        return Ok(false);
    }
    let wanted: Vec<i64> = match &config.layers_to_transform {
        None => return Ok(true),
        Some(IntOrList::One(i)) => vec![*i],
        Some(IntOrList::Many(v)) if v.is_empty() => return Ok(true),
        Some(IntOrList::Many(v)) => v.clone(),
    };
    let patterns: Vec<String> = match &config.layers_pattern {
        None => Vec::new(),
        Some(StrOrList::One(p)) => vec![p.clone()],
        Some(StrOrList::Many(v)) => v.clone(),
    };
    Ok(layer_index(name, &patterns)?.is_some_and(|i| wanted.contains(&(i as i64))))
}

/// Injects a fresh LoRA adapter named `adapter_name` into every module the config selects
/// and returns their names. No match at all is an error listing modules that exist, as in
/// PEFT.
pub fn inject_adapter<B: LoraOps, M: Model<B> + ?Sized>(
    model: &mut M,
    backend: &B,
    config: &LoraConfig,
    adapter_name: &str,
    seed: u64,
) -> Result<Vec<String>> {
    config.check_supported()?;
    let targets = config
        .target_modules
        .as_ref()
        .ok_or_else(|| PeftError::Unsupported {
            field: "target_modules",
            value: "null".into(),
            reason: "name the modules to adapt (a list, a regex, or \"all-linear\")".into(),
        })?;
    // "all-linear" means every linear layer but the output head, as in PEFT.
    let head = match targets {
        TargetModules::Pattern(p) if p == "all-linear" => model.output_head(),
        _ => None,
    };
    let mut injected = Vec::new();
    for layer in model.linears_mut() {
        let name = layer.name().to_string();
        if !selects(config, &name)? || head.as_deref() == Some(name.as_str()) {
            continue;
        }
        let spec = config.spec_for(&name, seed)?;
        match config.use_dora {
            true => layer.add_dora(backend, adapter_name, &spec)?,
            false => layer.add_lora(backend, adapter_name, &spec)?,
        }
        // PiSSA / OLoRA: from the base weight, which loses `s·B A` (as in PEFT, also when
        // an adapter trained from them is loaded).
        if let Some(method) = config.init_method() {
            crate::initialise(
                backend,
                layer,
                adapter_name,
                method,
                spec.scaling(),
                spec.seed,
            )?;
        }
        injected.push(name);
    }
    // LoRA on embeddings (`lora_embedding_A/B`); "all-linear" leaves them out, as in PEFT.
    let all_linear = matches!(targets, TargetModules::Pattern(p) if p == "all-linear");
    for emb in model.embeddings_mut() {
        let name = emb.name().to_string();
        if all_linear || !selects(config, &name)? {
            continue;
        }
        if config.init_method().is_some() {
            return Err(PeftError::Unsupported {
                field: "init_lora_weights",
                value: format!("{:?}", config.init_lora_weights),
                reason: format!("PiSSA/OLoRA on the embedding {name} is not implemented"),
            });
        }
        let spec = config.spec_for(&name, seed)?;
        match config.use_dora {
            true => emb.add_dora(backend, adapter_name, &spec)?,
            false => emb.add_lora(backend, adapter_name, &spec)?,
        }
        injected.push(name);
    }
    inject_trainable_tokens(model, backend, config, adapter_name)?;
    if injected.is_empty() {
        let names = model.linear_names();
        let shown: Vec<_> = names.iter().take(8).cloned().collect();
        let more = if names.len() > 8 {
            format!(" (and {} more)", names.len() - 8)
        } else {
            String::new()
        };
        let mut targets = rule_text(targets);
        if let Some(l) = &config.layers_to_transform {
            targets.push_str(&format!(" with layers_to_transform {l:?}"));
        }
        return Err(PeftError::NoTargetMatched {
            targets,
            available: format!("{}{more}", shown.join(", ")),
        });
    }
    Ok(injected)
}

/// PEFT's `trainable_token_indices`: each named embedding (a plain list: the input
/// embedding) trains the listed rows. A name no embedding has is an error naming the field.
fn inject_trainable_tokens<B: LoraOps, M: Model<B> + ?Sized>(
    model: &mut M,
    backend: &B,
    config: &LoraConfig,
    adapter_name: &str,
) -> Result<()> {
    let input = model.input_embedding();
    for (module, ids) in config.token_targets(input.as_deref())? {
        let mut embeddings = model.embeddings_mut();
        let names: Vec<String> = embeddings.iter().map(|e| e.name().to_string()).collect();
        let emb = embeddings
            .iter_mut()
            .find(|e| e.name() == module || e.name().ends_with(&format!(".{module}")))
            .ok_or_else(|| PeftError::Unsupported {
                field: "trainable_token_indices",
                value: module.clone(),
                reason: format!("no embedding of that name; the model's embeddings: {names:?}"),
            })?;
        emb.add_trainable_tokens(backend, adapter_name, &ids)?;
    }
    Ok(())
}

/// [`inject_adapter`] under PEFT's default adapter name.
pub fn inject_adapters<B: LoraOps, M: Model<B> + ?Sized>(
    model: &mut M,
    backend: &B,
    config: &LoraConfig,
    seed: u64,
) -> Result<Vec<String>> {
    inject_adapter(model, backend, config, DEFAULT_ADAPTER, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_matches_exact_or_dotted_suffix() -> Result<()> {
        let rule = TargetModules::List(vec!["query".into(), "output.dense".into()]);
        assert!(matches(&rule, "encoder.layer.0.attention.self.query", "t")?);
        assert!(matches(&rule, "query", "t")?);
        assert!(!matches(
            &rule,
            "encoder.layer.0.attention.self.subquery",
            "t"
        )?);
        assert!(matches(&rule, "encoder.layer.0.output.dense", "t")?);
        assert!(!matches(&rule, "encoder.layer.0.intermediate.dense", "t")?);
        Ok(())
    }

    #[test]
    fn string_is_a_full_match_regex() -> Result<()> {
        let rule = TargetModules::Pattern(r".*\.(query|value)".into());
        assert!(matches(&rule, "a.query", "t")?);
        assert!(!matches(&rule, "a.query.x", "t")?);
        let bad = TargetModules::Pattern("(".into());
        assert!(matches(&bad, "a", "target_modules").is_err());
        Ok(())
    }

    #[test]
    fn layers_to_transform_follows_peft() -> Result<()> {
        let cfg = LoraConfig {
            target_modules: Some(TargetModules::List(vec![
                "query".into(),
                "encoder.layer.1.attention.self.value".into(),
            ])),
            layers_to_transform: Some(IntOrList::Many(vec![1])),
            ..LoraConfig::default()
        };
        assert!(selects(&cfg, "encoder.layer.1.attention.self.query")?);
        assert!(!selects(&cfg, "encoder.layer.0.attention.self.query")?);
        // An exact list entry is not filtered by layer (PEFT checks indices on suffix matches only).
        assert!(selects(&cfg, "encoder.layer.1.attention.self.value")?);
        let with_pattern = LoraConfig {
            layers_pattern: Some(StrOrList::One("layer".into())),
            layers_to_transform: Some(IntOrList::One(0)),
            ..cfg.clone()
        };
        assert!(selects(
            &with_pattern,
            "encoder.layer.0.attention.self.query"
        )?);
        assert!(!selects(
            &with_pattern,
            "encoder.layer.1.attention.self.query"
        )?);
        let excluded = LoraConfig {
            exclude_modules: Some(TargetModules::List(vec!["self.query".into()])),
            ..cfg
        };
        assert!(!selects(&excluded, "encoder.layer.1.attention.self.query")?);
        Ok(())
    }
}
