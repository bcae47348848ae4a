//! Trained token rows (PEFT's trainable tokens) in `lora merge`: checked against the base
//! checkpoint before anything is written; `merge_checkpoint` then writes them into the
//! embedding table's rows.

use std::collections::BTreeMap;
use std::path::Path;

use lora_core::HostTensor;
use lora_io::{Checkpoint, is_float};

use crate::config::LoraConfig;
use crate::error::{PeftError, Result};

/// Trained token rows (PEFT's trainable tokens) that replace rows of an embedding table.
pub(crate) struct TokenRows {
    pub indices: Vec<usize>,
    pub rows: HostTensor,
}

/// Checks the trained token rows against the base (a 2-D float table with `dim` columns,
/// every id inside it) and returns them by base tensor name. The ids come from the config:
/// a plain list is the one embedding the file has rows for.
pub(crate) fn checked_token_rows(
    ckpt: &Checkpoint,
    weights_path: &Path,
    config: &LoraConfig,
    rows: BTreeMap<String, HostTensor>,
) -> Result<BTreeMap<String, TokenRows>> {
    let bad = |reason: String| PeftError::Format {
        path: weights_path.display().to_string(),
        reason,
    };
    let only = (rows.len() == 1)
        .then(|| rows.keys().next().cloned())
        .flatten();
    let targets = config.token_targets(only.as_deref())?;
    if rows.is_empty() && targets.is_empty() {
        return Ok(BTreeMap::new());
    }
    let tensors = ckpt.tensors()?;
    let mut out = BTreeMap::new();
    for (module, t) in rows {
        let ids = targets
            .iter()
            .find(|(m, _)| module == *m || module.ends_with(&format!(".{m}")))
            .map(|(_, ids)| ids.clone())
            .ok_or_else(|| bad(format!(
                "holds trained token rows for {module}, but the config's trainable_token_indices do not name it"
            )))?;
        let key = format!("{module}.weight");
        let view = tensors.get(&key).ok_or_else(|| {
            bad(format!(
                "trained token rows for {module}, but the base has no tensor {key}"
            ))
        })?;
        let (&[vocab, dim], &[n, d]) = (view.shape.as_slice(), t.shape.as_slice()) else {
            return Err(bad(format!(
                "{key} {:?} or the token rows {:?} are not 2-D",
                view.shape, t.shape
            )));
        };
        if !is_float(view.dtype) || d != dim || n != ids.len() {
            return Err(bad(format!(
                "token rows of {module} {:?} do not fit base {key} {:?} {:?} with {} trainable_token_indices",
                t.shape,
                view.dtype,
                view.shape,
                ids.len()
            )));
        }
        if let Some(&i) = ids.iter().find(|&&i| i >= vocab) {
            return Err(bad(format!(
                "trainable_token_indices: token id {i} is past {key}'s {vocab} rows"
            )));
        }
        out.insert(
            key,
            TokenRows {
                indices: ids,
                rows: t,
            },
        );
    }
    Ok(out)
}
