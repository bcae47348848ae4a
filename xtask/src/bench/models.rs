//! The models benchmarked whole against PyTorch + PEFT (all-MiniLM-L6-v2, the random
//! Llama): PyTorch's medians, bracketed by a run before and after ours, and our criterion
//! medians as rows against them.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::report::Row;

/// A model benchmarked whole against PyTorch + PEFT: its criterion group prefix, the
/// prefix of its report ops, and PyTorch's medians (keys `"<op>/<shape>"`).
pub(super) struct ModelFamily<'a> {
    pub(super) group: &'static str,
    pub(super) op_prefix: &'static str,
    pub(super) torch: &'a Value,
}

/// PyTorch + PEFT's rows of one model family.
pub(super) fn torch_rows(f: &ModelFamily<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    for (op, v) in f.torch.as_object().into_iter().flatten() {
        let Some((op, shape)) = op.split_once('/') else {
            continue;
        };
        if let Some(t) = v["median_s"].as_f64() {
            let extra = ["before_s", "after_s"]
                .into_iter()
                .filter_map(|k| Some((k, json!(v[k].as_f64()?))))
                .collect();
            rows.push(Row {
                backend: "pytorch+peft".into(),
                op: format!("{}{op}", f.op_prefix),
                shape: shape.into(),
                median_s: t,
                extra,
            });
        }
    }
    rows
}

/// One whole-model bench: `"<backend>/<op>/<shape>"`, against PyTorch + PEFT's time for
/// the same op.
pub(super) fn model_row(function: &str, median_ns: f64, f: &ModelFamily<'_>) -> Option<Row> {
    let mut parts = function.splitn(3, '/');
    let (Some(be), Some(op), Some(shape)) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    let mut extra = BTreeMap::new();
    if let Some(t) = f.torch[format!("{op}/{shape}").as_str()]["median_s"].as_f64() {
        extra.insert(
            "vs_pytorch",
            json!((median_ns * 1e-9 / t * 1e4).round() / 1e4),
        );
    }
    Some(Row {
        backend: be.into(),
        op: format!("{}{op}", f.op_prefix),
        shape: shape.into(),
        median_s: median_ns * 1e-9,
        extra,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's row of a model takes the bracketed mean (`bracket.rs`) and keeps the runs
    /// before and after ours for the table; a figure from one run has neither.
    #[test]
    fn torch_rows_keep_the_runs_before_and_after() {
        let torch = json!({
            "step/a": {"median_s": 1.25, "before_s": 1.0, "after_s": 1.5},
            "gen/a": {"median_s": 2.0},
        });
        let rows = torch_rows(&ModelFamily {
            group: "m_",
            op_prefix: "m_",
            torch: &torch,
        });
        let row = |op: &str| rows.iter().find(|r| r.op == op);
        let step = row("m_step");
        assert_eq!(step.map(|r| r.median_s), Some(1.25));
        assert_eq!(
            step.and_then(|r| r.extra.get("before_s")),
            Some(&json!(1.0))
        );
        assert_eq!(step.and_then(|r| r.extra.get("after_s")), Some(&json!(1.5)));
        assert_eq!(row("m_gen").map(|r| r.extra.is_empty()), Some(true));
    }
}
