//! Training data for `lora train --task causal-lm`: `.jsonl` lines with `"text"` (every
//! token counts in the loss) or `"prompt"` + `"completion"` (only the completion's tokens
//! count), or a `.txt` file packed into blocks of `--max-length` tokens.

use std::path::Path;

use anyhow::{Context, Result, bail};
use lora::models::decoder::{DecoderTokenizer, IGNORE_INDEX};

/// One training sequence: token ids and the labels the loss counts (`-100` elsewhere).
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    /// Token ids.
    pub ids: Vec<u32>,
    /// The label of each position: the id the loss predicts there, or `IGNORE_INDEX`.
    pub labels: Vec<i64>,
}

/// Reads and tokenizes `path`; sequences are cut at `max_length` tokens.
pub fn read(
    path: &Path,
    tok: &DecoderTokenizer,
    max_length: usize,
    eos: Option<u32>,
) -> Result<Vec<Sequence>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if text.trim().is_empty() {
        bail!("{}: the data file is empty", path.display());
    }
    let seqs = match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => jsonl(path, &text, tok, max_length, eos)?,
        Some("txt") => packed(&text, tok, max_length)?,
        _ => bail!("{}: expected a .jsonl or .txt file", path.display()),
    };
    if seqs.is_empty() {
        bail!("{}: no sequence with at least two tokens", path.display());
    }
    Ok(seqs)
}

fn jsonl(
    path: &Path,
    text: &str,
    tok: &DecoderTokenizer,
    max_length: usize,
    eos: Option<u32>,
) -> Result<Vec<Sequence>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let field = |k: &str| v.get(k).and_then(serde_json::Value::as_str);
        let (mut ids, mut labels) = match (field("text"), field("prompt"), field("completion")) {
            (Some(t), _, _) => {
                let ids = tok.encode(t).with_context(at)?;
                let labels = ids.iter().map(|&i| i as i64).collect();
                (ids, labels)
            }
            (None, Some(p), Some(c)) => {
                let mut ids = tok.encode(p).with_context(at)?;
                let mut labels = vec![IGNORE_INDEX; ids.len()];
                let completion = tok.encode_plain(c).with_context(at)?;
                labels.extend(completion.iter().map(|&i| i as i64));
                ids.extend(completion);
                (ids, labels)
            }
            _ => bail!(
                "{}: needs a \"text\" field, or \"prompt\" and \"completion\"",
                at()
            ),
        };
        if let Some(e) = eos {
            ids.push(e);
            labels.push(e as i64);
        }
        ids.truncate(max_length);
        labels.truncate(max_length);
        if ids.len() >= 2 {
            out.push(Sequence { ids, labels });
        }
    }
    Ok(out)
}

/// The whole text as one token stream, cut into blocks of `max_length`.
fn packed(text: &str, tok: &DecoderTokenizer, max_length: usize) -> Result<Vec<Sequence>> {
    let ids = tok.encode(text)?;
    Ok(ids
        .chunks(max_length)
        .filter(|c| c.len() >= 2)
        .map(|c| Sequence {
            ids: c.to_vec(),
            labels: c.iter().map(|&i| i as i64).collect(),
        })
        .collect())
}
