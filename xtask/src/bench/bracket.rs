//! PyTorch's baselines bracketed by a run before ours and one after (`target/bench/<name>.json`
//! after, `<name>_before.json` before; see `model_baselines` in `mod.rs` for why).

use std::path::Path;

use serde_json::{Value, json};

use super::report::read_json;

/// The figures of `target/bench/<name>.json` (the run after our benches) averaged with
/// those of `<name>_before.json`: every number both files hold at the same place becomes
/// the mean of the two, and a `median_s` also keeps them as `before_s` and `after_s`.
/// What only the run after holds stays as it is; what only the run before holds is
/// dropped (its run after failed or was not made).
pub(super) fn bracketed(target: &Path, name: &str) -> Value {
    let file = |suffix: &str| read_json(&target.join(format!("bench/{name}{suffix}.json")));
    let mut after = file("").unwrap_or(json!({}));
    if let Some(before) = file(super::BEFORE) {
        average_into(&mut after, &before);
    }
    after
}

/// `after`'s numbers that `before` also holds, replaced by the mean of the two (see
/// [`bracketed`]).
fn average_into(after: &mut Value, before: &Value) {
    let Some(fields) = after.as_object_mut() else {
        return;
    };
    let mut runs = None;
    for (key, v) in fields.iter_mut() {
        match (v.as_f64(), before[key.as_str()].as_f64()) {
            (Some(a), Some(b)) => {
                *v = json!((a + b) / 2.0);
                if key == "median_s" {
                    runs = Some((b, a));
                }
            }
            _ => average_into(v, &before[key.as_str()]),
        }
    }
    if let Some((b, a)) = runs {
        fields.insert("before_s".into(), json!(b));
        fields.insert("after_s".into(), json!(a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A figure both runs have is their mean (a `median_s` keeps the two), at any depth;
    /// one from the run after ours alone stays; one from the run before alone is dropped;
    /// text is left alone.
    #[test]
    fn bracketed_figures_are_the_means_of_the_runs_before_and_after() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("bench"))?;
        let write = |name: &str, v: Value| {
            std::fs::write(dir.path().join("bench").join(name), v.to_string())
        };
        write(
            "m_before.json",
            json!({"torch": "2.13", "step/a": {"median_s": 1.0}, "fwd/a": {"median_s": 9.0},
                   "layer/b": {"lora_s": 2.0, "ratio": 1.2}, "matmul": {"64x64x64": {"median_s": 3.0}}}),
        )?;
        write(
            "m.json",
            json!({"torch": "2.13", "step/a": {"median_s": 1.5}, "gen/a": {"median_s": 2.0},
                   "layer/b": {"lora_s": 4.0, "ratio": 1.0}, "matmul": {"64x64x64": {"median_s": 5.0}}}),
        )?;
        let v = bracketed(dir.path(), "m");
        assert_eq!(
            v["step/a"],
            json!({"median_s": 1.25, "before_s": 1.0, "after_s": 1.5})
        );
        assert_eq!(v["gen/a"], json!({"median_s": 2.0}));
        assert!(v.get("fwd/a").is_none(), "{v}");
        assert_eq!(v["layer/b"], json!({"lora_s": 3.0, "ratio": 1.1}));
        assert_eq!(v["matmul"]["64x64x64"]["median_s"].as_f64(), Some(4.0));
        assert_eq!(v["torch"], json!("2.13"));
        // Without a run before, the run after as it is.
        std::fs::remove_file(dir.path().join("bench/m_before.json"))?;
        assert_eq!(
            bracketed(dir.path(), "m")["step/a"],
            json!({"median_s": 1.5})
        );
        Ok(())
    }
}
