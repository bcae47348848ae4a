//! PEFT's regular-expression rules for module names: patterns compiled with the field
//! they came from (so errors name it), and `rank_pattern` / `alpha_pattern` lookup.

use std::collections::BTreeMap;

use regex::Regex;

use crate::error::{PeftError, Result};

/// Compiles `full` (the anchored form of `pattern`), naming `field` on error.
pub(crate) fn compile(field: &'static str, pattern: &str, full: String) -> Result<Regex> {
    Regex::new(&full).map_err(|e| PeftError::Pattern {
        field,
        pattern: pattern.to_string(),
        reason: e.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn an_invalid_pattern_names_its_field() {
        let mut p = BTreeMap::new();
        p.insert("(".to_string(), 1usize);
        match pattern_value(&p, "a", "alpha_pattern") {
            Err(e) => assert!(e.to_string().contains("alpha_pattern"), "{e}"),
            Ok(v) => panic!("an invalid pattern matched: {v:?}"),
        }
    }
}
