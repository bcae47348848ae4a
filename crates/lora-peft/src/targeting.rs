//! PEFT's rules for which modules get adapters, and with which rank and alpha.

use std::collections::BTreeMap;

use lora_core::{LoraOps, Model};
use regex::Regex;

use crate::config::{LoraConfig, TargetModules};
use crate::error::{PeftError, Result};

fn compile(field: &'static str, pattern: &str, full: String) -> Result<Regex> {
    Regex::new(&full).map_err(|e| PeftError::Pattern {
        field,
        pattern: pattern.to_string(),
        reason: e.to_string(),
    })
}

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

/// The value of the first `rank_pattern`/`alpha_pattern` key that matches `name` as PEFT
/// does (`(.*\.)?key$` anchored at the start), if any.
pub fn pattern_value<'a, V>(
    patterns: &'a BTreeMap<String, V>,
    name: &str,
    field: &'static str,
) -> Result<Option<&'a V>> {
    for (key, value) in patterns {
        if compile(field, key, format!(r"^(?:.*\.)?(?:{key})$"))?.is_match(name) {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

fn rule_text(rule: &TargetModules) -> String {
    match rule {
        TargetModules::List(l) => format!("{l:?}"),
        TargetModules::Pattern(p) => format!("{p:?}"),
    }
}

/// Injects a fresh LoRA adapter into every module the config selects and returns their
/// names. No match at all is an error listing modules that exist, as in PEFT.
pub fn inject_adapters<B: LoraOps, M: Model<B> + ?Sized>(
    model: &mut M,
    backend: &B,
    config: &LoraConfig,
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
    let mut injected = Vec::new();
    for layer in model.linears_mut() {
        let name = layer.name().to_string();
        if !matches(targets, &name, "target_modules")? {
            continue;
        }
        if let Some(ex) = &config.exclude_modules
            && matches(ex, &name, "exclude_modules")?
        {
            continue;
        }
        layer.inject_lora(backend, &config.spec_for(&name, seed)?)?;
        injected.push(name);
    }
    if injected.is_empty() {
        let names = model.linear_names();
        let shown: Vec<_> = names.iter().take(8).cloned().collect();
        let more = if names.len() > 8 {
            format!(" (and {} more)", names.len() - 8)
        } else {
            String::new()
        };
        return Err(PeftError::NoTargetMatched {
            targets: rule_text(targets),
            available: format!("{}{more}", shown.join(", ")),
        });
    }
    Ok(injected)
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
    fn rank_pattern_uses_suffix_anchoring() -> Result<()> {
        let mut p = BTreeMap::new();
        p.insert("layers.2".to_string(), 4usize);
        assert_eq!(pattern_value(&p, "layers.2", "rank_pattern")?, Some(&4));
        assert_eq!(
            pattern_value(&p, "model.layers.2", "rank_pattern")?,
            Some(&4)
        );
        assert_eq!(pattern_value(&p, "layers.20", "rank_pattern")?, None);
        Ok(())
    }
}
