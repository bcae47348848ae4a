//! `lora inspect`: what an adapter directory holds.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use lora::peft::{self, LoraConfig};
use serde_json::json;

use std::fmt::Write as _;

use crate::report::{print_stdout, thousands};

/// Options of `lora inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// PEFT adapter directory, or a checkpoint (`.safetensors` file or model directory).
    pub adapter_dir: PathBuf,
    /// Which adapter of the directory (non-default adapters live in `<dir>/<name>/`).
    #[arg(long, default_value = "default")]
    pub adapter_name: String,
    /// Print JSON on stdout and nothing else.
    #[arg(long)]
    pub json: bool,
}

/// Runs `lora inspect`.
pub fn run(args: &InspectArgs) -> Result<()> {
    let mut out = String::new();
    let result = inspect_adapter(args, &mut out);
    print_stdout(&out);
    result
}

fn inspect_adapter(args: &InspectArgs, out: &mut String) -> Result<()> {
    let dir = peft::adapter_dir_for(&args.adapter_dir, &args.adapter_name);
    if !dir.join(peft::CONFIG_FILE).is_file() {
        return inspect_checkpoint(args, out);
    }
    let config = LoraConfig::from_file(&dir.join(peft::CONFIG_FILE))?;
    let weights = dir.join(peft::WEIGHTS_FILE);
    let file = lora::io::MappedFile::open(&weights)?;
    let st = file.tensors()?;
    let dtypes: std::collections::BTreeMap<String, String> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, format!("{:?}", v.dtype())))
        .collect();
    let file_tensors = lora::io::read_safetensors(&weights)?;
    let modules = peft::lora_modules(&file_tensors, &weights, &args.adapter_name)
        .with_context(|| format!("reading {}", weights.display()))?;
    let token_rows = peft::token_rows(&file_tensors, &args.adapter_name);
    let mut rows = Vec::new();
    let mut total = 0usize;
    for (
        module,
        peft::ModuleTensors {
            a,
            b,
            magnitude,
            embedding,
        },
    ) in &modules
    {
        let spec = config.spec_for(module, 0)?;
        let params = a.data.len() + b.data.len() + magnitude.as_ref().map_or(0, |m| m.data.len());
        total += params;
        let dtype = dtypes
            .iter()
            .find(|(k, _)| {
                k.contains(&format!("{module}.lora_A"))
                    || k.contains(&format!("{module}.lora_embedding_A"))
            })
            .map_or("?".to_string(), |(_, d)| d.clone());
        rows.push(json!({
            "module": module,
            "r": a.shape[0],
            "lora_alpha": spec.alpha,
            "scaling": spec.scaling(),
            "in_features": a.shape[1],
            "out_features": b.shape[0],
            "parameters": params,
            "dtype": dtype,
            "dora": magnitude.is_some(),
            "kind": if *embedding { "lora_embedding" } else { "lora" },
        }));
    }
    // Trained token rows (PEFT's trainable tokens): the ids are in the config.
    let token_ids = config.token_targets(token_rows.keys().next().map(String::as_str))?;
    for (module, t) in &token_rows {
        let ids = token_ids
            .iter()
            .find(|(m, _)| module == m || module.ends_with(&format!(".{m}")))
            .map(|(_, ids)| ids.clone())
            .unwrap_or_default();
        total += t.data.len();
        rows.push(json!({
            "module": module,
            "kind": "trainable_tokens",
            "tokens": ids,
            "r": 0,
            "lora_alpha": 0,
            "scaling": 0.0,
            "in_features": t.shape[1],
            "out_features": t.shape[0],
            "parameters": t.data.len(),
            "dtype": dtypes.iter().find(|(k, _)| k.contains(&format!("{module}.token_adapter"))).map_or("?".to_string(), |(_, d)| d.clone()),
            "dora": false,
        }));
    }
    if args.json {
        let doc = json!({
            "adapter_dir": dir.display().to_string(),
            "config": serde_json::to_value(&config)?,
            "modules": rows,
            "total_parameters": total,
        });
        out.push_str(&(serde_json::to_string_pretty(&doc)? + "\n"));
        return Ok(());
    }
    writeln!(out, "adapter {} ({})", args.adapter_name, dir.display())?;
    writeln!(
        out,
        "  peft_type {}, r {}, lora_alpha {}, dropout {}, rsLoRA {}, init {:?}",
        config.peft_type,
        config.r,
        config.lora_alpha,
        config.lora_dropout,
        config.use_rslora,
        config.init_lora_weights
    )?;
    writeln!(out, "  target_modules {:?}", config.target_modules)?;
    if let Some(b) = &config.base_model_name_or_path {
        writeln!(out, "  base model {b}")?;
    }
    writeln!(
        out,
        "  {} modules, {} trainable parameters",
        rows.len(),
        thousands(total)
    )?;
    writeln!(
        out,
        "  {:<48} {:>4} {:>7} {:>8} {:>12} {:>10}  dtype",
        "module", "r", "alpha", "scaling", "[out, in]", "params"
    )?;
    for r in &rows {
        if r["kind"] == "trainable_tokens" {
            writeln!(
                out,
                "  {:<48} trainable tokens {} ({} rows of {}), {} params",
                r["module"].as_str().unwrap_or(""),
                r["tokens"],
                r["out_features"],
                r["in_features"],
                thousands(r["parameters"].as_u64().unwrap_or(0) as usize),
            )?;
            continue;
        }
        writeln!(
            out,
            "  {:<48} {:>4} {:>7} {:>8.4} {:>12} {:>10}  {}",
            r["module"].as_str().unwrap_or(""),
            r["r"].to_string(),
            r["lora_alpha"].to_string(),
            r["scaling"].as_f64().unwrap_or(0.0),
            format!("[{}, {}]", r["out_features"], r["in_features"]),
            thousands(r["parameters"].as_u64().unwrap_or(0) as usize),
            r["dtype"].as_str().unwrap_or(""),
        )?;
    }
    Ok(())
}

/// `lora inspect` on a checkpoint: tensor counts and dtypes, and every quantized module's
/// format, blocksize and bits per parameter.
fn inspect_checkpoint(args: &InspectArgs, out: &mut String) -> Result<()> {
    let path = &args.adapter_dir;
    let ck = lora::io::Checkpoint::open(path).with_context(|| {
        format!(
            "{} is neither an adapter directory nor a checkpoint",
            path.display()
        )
    })?;
    let tensors = ck.tensors()?;
    let summary = lora::io::quant_summary(path)?;
    let mut dtypes: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    let mut stored_bytes = 0usize;
    for t in tensors.values() {
        *dtypes.entry(format!("{:?}", t.dtype)).or_default() += 1;
        stored_bytes += t.data.len();
    }
    let modules: Vec<_> = summary
        .modules
        .iter()
        .map(|(m, f, bs, dq, bits)| {
            json!({"module": m, "format": f, "blocksize": bs, "double_quant": dq, "bits_per_parameter": bits})
        })
        .collect();
    let bits = if summary.values > 0 {
        summary.bytes as f64 * 8.0 / summary.values as f64
    } else {
        0.0
    };
    if args.json {
        let doc = json!({
            "checkpoint": path.display().to_string(),
            "tensors": tensors.len(),
            "bytes": stored_bytes,
            "dtypes": dtypes,
            "quantized_modules": modules,
            "quantized_values": summary.values,
            "bits_per_quantized_parameter": bits,
        });
        out.push_str(&(serde_json::to_string_pretty(&doc)? + "\n"));
        return Ok(());
    }
    writeln!(out, "checkpoint {}", path.display())?;
    writeln!(
        out,
        "  {} tensors, {} bytes; dtypes {}",
        tensors.len(),
        thousands(stored_bytes),
        dtypes
            .iter()
            .map(|(d, n)| format!("{d} x{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    if summary.modules.is_empty() {
        writeln!(out, "  not quantized")?;
        return Ok(());
    }
    writeln!(
        out,
        "  {} quantized modules, {} values, {:.3} bits per parameter",
        summary.modules.len(),
        thousands(summary.values),
        bits
    )?;
    writeln!(
        out,
        "  {:<48} {:>6} {:>9} {:>7} {:>6}",
        "module", "format", "blocksize", "dq", "bits"
    )?;
    for (m, f, bs, dq, b) in &summary.modules {
        let bs = if *bs == 0 {
            "-".to_string()
        } else {
            bs.to_string()
        };
        writeln!(out, "  {m:<48} {f:>6} {bs:>9} {dq:>7} {b:>6.3}")?;
    }
    Ok(())
}
