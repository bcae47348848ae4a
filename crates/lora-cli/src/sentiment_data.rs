//! The `lora train` task's data: the VADER sentiment lexicon (Hutto & Gilbert, ICWSM 2014;
//! MIT licence), shipped inside the `vaderSentiment` wheel on PyPI. Each entry is a token
//! with the mean valence ten human raters gave it on [-4, 4]; the task is to tell
//! positive words from negative ones. `cargo xtask fetch-data vader` unpacks it into the
//! cache.

use std::path::Path;

use anyhow::{Context, Result, bail};
use lora::rng::{RngState, uniform};

/// A labelled word.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// The word.
    pub text: String,
    /// 1 positive, 0 negative.
    pub label: usize,
}

/// Reads the lexicon and keeps plain words (`[a-z][a-z'-]*`) whose mean valence is at
/// least `min_valence` away from neutral, labelled by its sign.
pub fn read_vader(path: &Path, min_valence: f64) -> Result<Vec<Example>> {
    let text = std::fs::read(path).with_context(|| {
        format!(
            "reading {} (run `cargo xtask fetch-data vader` to fetch the VADER lexicon)",
            path.display()
        )
    })?;
    let text = String::from_utf8_lossy(&text);
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut fields = line.split('\t');
        let (Some(word), Some(mean)) = (fields.next(), fields.next()) else {
            continue;
        };
        let mean: f64 = mean.trim().parse().with_context(|| {
            format!(
                "{}:{}: valence {mean:?} is not a number",
                path.display(),
                n + 1
            )
        })?;
        let plain = word.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && word
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '\'' || c == '-');
        if plain && mean.abs() >= min_valence {
            out.push(Example {
                text: word.to_string(),
                label: usize::from(mean > 0.0),
            });
        }
    }
    if out.len() < 10 {
        bail!(
            "{}: only {} usable entries; is this vader_lexicon.txt?",
            path.display(),
            out.len()
        );
    }
    Ok(out)
}

/// A seeded shuffle (Philox keys), then `test_fraction` of the examples held out.
pub fn split(data: Vec<Example>, test_fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    let mut keys = vec![0.0f32; data.len()];
    uniform(RngState::new(seed, 0x7ada), 0.0, 1.0, &mut keys);
    let mut keyed: Vec<(f32, Example)> = keys.into_iter().zip(data).collect();
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut shuffled: Vec<Example> = keyed.into_iter().map(|(_, e)| e).collect();
    let n_test = ((shuffled.len() as f64) * test_fraction).round() as usize;
    let test = shuffled.split_off(shuffled.len() - n_test);
    (shuffled, test)
}
