//! The layer-level operations decoder LLMs (Llama, Mistral, Qwen) add to the backend
//! contract, written once over the primitives: RMSNorm, SiLU, rotary position embedding.
//! A backend may override any of them with a fused kernel; the defaults are the reference
//! semantics (transformers' `LlamaRMSNorm`, `nn.SiLU`, `apply_rotary_pos_emb`).

use crate::backend::{Backend, BinaryOp, Tensor, Transpose, UnaryOp};
use crate::error::{Error, Result};
use crate::ops::attention::{AttentionMask, attention_backward, attention_forward};
use crate::ops::attention_rows::{attention_rows_backward, attention_rows_forward};
use crate::ops::lora::TensorShapeExt;

/// Decoder-LLM operations with default implementations over [`Backend`] primitives.
pub trait DecoderOps: Backend {
    /// RMSNorm over the last axis of `x` (`[rows, n]` as a matrix view):
    /// `y = x / sqrt(mean(x²) + eps) * weight`. Returns `y` and the per-row
    /// `1 / sqrt(mean(x²) + eps)` (`[rows]`) for the backward.
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        eps: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let (rows, n) = check_rms_norm(x, weight)?;
        let x2 = self.reshape(x, &[rows, n])?;
        let mean_sq = self.affine(
            &self.sum_cols(&self.unary(UnaryOp::Square, &x2)?)?,
            1.0 / n as f32,
            eps,
        )?;
        let ones = self.affine(&mean_sq, 0.0, 1.0)?;
        let inv_rms = self.binary(BinaryOp::Div, &ones, &self.unary(UnaryOp::Sqrt, &mean_sq)?)?;
        let normed = self.binary(
            BinaryOp::Mul,
            &x2,
            &self.outer(&inv_rms, rows, n, RowOrCol::PerRow)?,
        )?;
        let y = self.binary(
            BinaryOp::Mul,
            &normed,
            &self.outer(weight, rows, n, RowOrCol::PerCol)?,
        )?;
        Ok((self.reshape(&y, x.shape_dims())?, inv_rms))
    }

    /// Backward of [`DecoderOps::rms_norm`] with respect to `x` (the weight is frozen):
    /// with `g = dy·weight` and `r` the saved per-row `1/rms`,
    /// `dx = r·g - x·r³·mean(g·x)`.
    fn rms_norm_backward(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        inv_rms: &Self::Tensor,
        dy: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let (rows, n) = check_rms_norm_backward(x, weight, inv_rms, dy)?;
        let x2 = self.reshape(x, &[rows, n])?;
        let g = self.binary(
            BinaryOp::Mul,
            &self.reshape(dy, &[rows, n])?,
            &self.outer(weight, rows, n, RowOrCol::PerCol)?,
        )?;
        let gx = self.sum_cols(&self.binary(BinaryOp::Mul, &g, &x2)?)?;
        let r2 = self.binary(BinaryOp::Mul, inv_rms, inv_rms)?;
        let r3 = self.binary(BinaryOp::Mul, &r2, inv_rms)?;
        let coef = self.affine(&self.binary(BinaryOp::Mul, &gx, &r3)?, 1.0 / n as f32, 0.0)?;
        let mut dx = self.binary(
            BinaryOp::Mul,
            &g,
            &self.outer(inv_rms, rows, n, RowOrCol::PerRow)?,
        )?;
        let corr = self.binary(
            BinaryOp::Mul,
            &x2,
            &self.outer(&coef, rows, n, RowOrCol::PerRow)?,
        )?;
        self.axpby(-1.0, &corr, 1.0, &mut dx)?;
        self.reshape(&dx, x.shape_dims())
    }

    /// SiLU, `x · sigmoid(x)` (with `sigmoid(x) = (1 + tanh(x / 2)) / 2`).
    fn silu(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let half = self.affine(x, 0.5, 0.0)?;
        let sig = self.affine(&self.unary(UnaryOp::Tanh, &half)?, 0.5, 0.5)?;
        self.binary(BinaryOp::Mul, x, &sig)
    }

    /// Backward of [`DecoderOps::silu`]: `dy · s·(1 + x·(1 - s))` with `s = sigmoid(x)`.
    fn silu_backward(&self, x: &Self::Tensor, dy: &Self::Tensor) -> Result<Self::Tensor> {
        let half = self.affine(x, 0.5, 0.0)?;
        let sig = self.affine(&self.unary(UnaryOp::Tanh, &half)?, 0.5, 0.5)?;
        let one_minus = self.affine(&sig, -1.0, 1.0)?;
        let inner = self.affine(&self.binary(BinaryOp::Mul, x, &one_minus)?, 1.0, 1.0)?;
        let d = self.binary(BinaryOp::Mul, &sig, &inner)?;
        self.binary(BinaryOp::Mul, dy, &d)
    }

    /// Backward of [`DecoderOps::rotary`]: the rotation is orthogonal per pair, so
    /// `dx = dy·cos + rotate_half_transposed(dy·sin)` with
    /// `rotate_half_transposed([a1, a2]) = [a2, -a1]`.
    fn rotary_backward(
        &self,
        dy: &Self::Tensor,
        cos: &Self::Tensor,
        sin: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let (rows, d) = check_rotary("rotary_backward", dy, cos, sin)?;
        let dy2 = self.reshape(dy, &[rows, d])?;
        let half = d / 2;
        let ds = self.binary(BinaryOp::Mul, &dy2, sin)?;
        let mut back = self.zeros(&[rows, d])?;
        self.assign_cols(&mut back, 0, &self.slice_cols(&ds, half, half)?)?;
        self.assign_cols(
            &mut back,
            half,
            &self.affine(&self.slice_cols(&ds, 0, half)?, -1.0, 0.0)?,
        )?;
        let mut dx = self.binary(BinaryOp::Mul, &dy2, cos)?;
        self.axpby(1.0, &back, 1.0, &mut dx)?;
        self.reshape(&dx, dy.shape_dims())
    }

    /// Rotary position embedding in transformers' `rotate_half` layout on `x` (`[rows, d]`
    /// as a matrix view, one attention head of one token per row) with per-row tables
    /// `cos`, `sin` (`[rows, d]`): `x·cos + rotate_half(x)·sin`, where
    /// `rotate_half([x1, x2]) = [-x2, x1]` over the two halves of the head.
    fn rotary(
        &self,
        x: &Self::Tensor,
        cos: &Self::Tensor,
        sin: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let (rows, d) = check_rotary("rotary", x, cos, sin)?;
        let x2 = self.reshape(x, &[rows, d])?;
        let half = d / 2;
        let mut rotated = self.zeros(&[rows, d])?;
        let second = self.slice_cols(&x2, half, half)?;
        self.assign_cols(&mut rotated, 0, &self.affine(&second, -1.0, 0.0)?)?;
        self.assign_cols(&mut rotated, half, &self.slice_cols(&x2, 0, half)?)?;
        let mut y = self.binary(BinaryOp::Mul, &x2, cos)?;
        self.axpby(
            1.0,
            &self.binary(BinaryOp::Mul, &rotated, sin)?,
            1.0,
            &mut y,
        )?;
        self.reshape(&y, x.shape_dims())
    }

    /// Per-row cross-entropy of `logits` (`[rows, vocab]` as a matrix view) against
    /// `targets` (one per row; `None` is an ignored row, as label `-100` in PyTorch):
    /// `logsumexp(row) - row[target]`, and 0 for ignored rows. Returns `[rows]`.
    ///
    /// The default goes through [`Backend::softmax`] and takes `-ln p[target]` on the host
    /// (`rows` values). A row whose target probability is below 1e-30 (where f32 loses
    /// digits to underflow) is fetched and its log-sum-exp taken on the host in f64.
    fn cross_entropy(
        &self,
        logits: &Self::Tensor,
        targets: &[Option<usize>],
    ) -> Result<Self::Tensor> {
        let (rows, vocab) = check_cross_entropy(logits, targets)?;
        let logits = self.reshape(logits, &[rows, vocab])?;
        let p = self.softmax(&logits, None)?;
        let flat = self.reshape(&p, &[rows * vocab, 1])?;
        let at: Vec<usize> = targets
            .iter()
            .enumerate()
            .map(|(r, t)| r * vocab + t.unwrap_or(0))
            .collect();
        let p_target = self.to_host(&self.gather_rows(&flat, &at)?)?;
        let mut nll = vec![0.0f32; rows];
        for (r, t) in targets.iter().enumerate() {
            let Some(t) = *t else { continue };
            nll[r] = if p_target[r] >= 1e-30 {
                -p_target[r].ln()
            } else {
                let row = self.to_host(&self.gather_rows(&logits, &[r])?)?;
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
                (f64::from(max) + sum.ln() - f64::from(row[t])) as f32
            };
        }
        self.from_host(&nll, &[rows])
    }

    /// Gradient of `scale * sum(cross_entropy(logits, targets))` with respect to the
    /// logits: `scale * (softmax(row) - onehot(target))` for counted rows, zero for ignored
    /// ones (`scale = 1 / counted` gives the gradient of the mean).
    fn cross_entropy_backward(
        &self,
        logits: &Self::Tensor,
        targets: &[Option<usize>],
        scale: f32,
    ) -> Result<Self::Tensor> {
        let (rows, vocab) = check_cross_entropy(logits, targets)?;
        let p = self.softmax(&self.reshape(logits, &[rows, vocab])?, None)?;
        let mut flat = self.reshape(&p, &[rows * vocab, 1])?;
        let counted: Vec<(usize, usize)> = targets
            .iter()
            .enumerate()
            .filter_map(|(r, t)| t.map(|t| (r, r * vocab + t)))
            .collect();
        let at: Vec<usize> = counted.iter().map(|&(_, i)| i).collect();
        let minus_one = self.from_host(&vec![-1.0; at.len()], &[at.len(), 1])?;
        self.scatter_add_rows(&mut flat, &at, &minus_one)?;
        let mut keep = vec![0.0f32; rows];
        counted.iter().for_each(|&(r, _)| keep[r] = scale);
        let keep = self.outer(
            &self.from_host(&keep, &[rows])?,
            rows,
            vocab,
            RowOrCol::PerRow,
        )?;
        self.binary(BinaryOp::Mul, &self.reshape(&flat, &[rows, vocab])?, &keep)
    }

    /// [`DecoderOps::cross_entropy`] and [`DecoderOps::cross_entropy_backward`] in one
    /// call, `(nll [rows], d_logits)`, for training steps. It takes the logits by value so
    /// that a backend may write the gradient into their storage (ndarray does, in one pass
    /// per row).
    fn cross_entropy_with_grad(
        &self,
        logits: Self::Tensor,
        targets: &[Option<usize>],
        scale: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let nll = self.cross_entropy(&logits, targets)?;
        let grad = self.cross_entropy_backward(&logits, targets, scale)?;
        Ok((nll, grad))
    }

    /// Backward of an embedding lookup (`gather_rows(table, ids)`): the `[vocab, hidden]`
    /// gradient of the table, row `v` the sum of the rows of `d_out` (`[ids.len(),
    /// hidden]`) whose id is `v`, added in the order of `ids` (ids may repeat).
    ///
    /// The default runs [`Backend::scatter_add_rows`] once per round of distinct ids (the
    /// k-th round takes each id's k-th occurrence), so it is deterministic on every backend.
    fn embedding_backward(
        &self,
        d_out: &Self::Tensor,
        ids: &[usize],
        vocab: usize,
    ) -> Result<Self::Tensor> {
        let hidden = check_embedding_backward(d_out, ids, vocab)?;
        let mut grad = self.zeros(&[vocab, hidden])?;
        for round in occurrence_rounds(ids) {
            let rows: Vec<usize> = round.iter().map(|&i| ids[i]).collect();
            let src = self.gather_rows(d_out, &round)?;
            self.scatter_add_rows(&mut grad, &rows, &src)?;
        }
        Ok(grad)
    }

    /// Self-attention of `q` (`[items, t, d]`) over `k`, `v` (`[items / group, kv, d]`),
    /// causal or not as the mask says: `out = softmax(scale·q·kᵀ + mask)·v` per item,
    /// query item `i` reading key/value item `i / group` (grouped-query attention without
    /// repeating the keys), a query that sees no key giving zero. Returns `(out [items, t,
    /// d], saved)`, `saved` being what the backward needs besides the inputs: the default ([`attention_forward`]) keeps the probabilities
    /// `[items * t, kv]`; a fused backend may keep less (ndarray: one log-sum-exp per
    /// query, `[items * t]`, and recomputes the probabilities blockwise).
    fn self_attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        mask: &AttentionMask<'_, Self::Tensor>,
        scale: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        attention_forward(self, q, k, v, mask, scale)
    }

    /// Backward of [`DecoderOps::self_attention`] from `d_out` (`[items, t, d]`), with
    /// the forward's inputs `(q, k, v)`, mask and `saved`: `(dq, dk, dv)`. The default is
    /// [`attention_backward`] (the probabilities it saved already hold the mask).
    fn self_attention_backward(
        &self,
        (q, k, v): (&Self::Tensor, &Self::Tensor, &Self::Tensor),
        saved: &Self::Tensor,
        _mask: &AttentionMask<'_, Self::Tensor>,
        d_out: &Self::Tensor,
        scale: f32,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        attention_backward(self, q, k, v, saved, d_out, scale)
    }

    /// [`DecoderOps::self_attention`] over the projections' own layout, `seqs` sequences:
    /// `q` `[seqs * t, heads * d]`, `k` and `v` `[seqs * kv, kv_heads * d]`, the output
    /// `[seqs * t, heads * d]` (see [`check_attention_rows`](crate::ops::check_attention_rows)); `saved` as
    /// `self_attention`'s. The default ([`attention_rows_forward`]) splits the heads into
    /// items and merges the output back; a backend may read each head in place.
    fn self_attention_rows(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        mask: &AttentionMask<'_, Self::Tensor>,
        seqs: usize,
        scale: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        attention_rows_forward(self, q, k, v, mask, seqs, scale)
    }

    /// Backward of [`DecoderOps::self_attention_rows`]: `(dq, dk, dv)` in the rows layout.
    fn self_attention_rows_backward(
        &self,
        qkv: (&Self::Tensor, &Self::Tensor, &Self::Tensor),
        saved: &Self::Tensor,
        mask: &AttentionMask<'_, Self::Tensor>,
        seqs: usize,
        d_out: &Self::Tensor,
        scale: f32,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        attention_rows_backward(self, qkv, saved, mask, seqs, d_out, scale)
    }

    /// `v` (`n` values) spread to a `[rows, cols]` matrix: each row `i` filled with
    /// `v[i]` (`PerRow`, `n = rows`) or each row equal to `v` (`PerCol`, `n = cols`), as the
    /// rank-1 product of `v` with ones (exact: one multiplication by 1 per element).
    fn outer(
        &self,
        v: &Self::Tensor,
        rows: usize,
        cols: usize,
        how: RowOrCol,
    ) -> Result<Self::Tensor> {
        let mut out = self.zeros(&[rows, cols])?;
        match how {
            RowOrCol::PerRow => {
                let v = self.reshape(v, &[rows, 1])?;
                let ones = self.affine(&self.zeros(&[1, cols])?, 0.0, 1.0)?;
                self.gemm(1.0, &v, Transpose::No, &ones, Transpose::No, 0.0, &mut out)?;
            }
            RowOrCol::PerCol => {
                let v = self.reshape(v, &[1, cols])?;
                let ones = self.affine(&self.zeros(&[rows, 1])?, 0.0, 1.0)?;
                self.gemm(1.0, &ones, Transpose::No, &v, Transpose::No, 0.0, &mut out)?;
            }
        }
        Ok(out)
    }
}

/// How [`DecoderOps::outer`] spreads a vector over a matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowOrCol {
    /// One value per row.
    PerRow,
    /// One value per column.
    PerCol,
}

/// Checks an RMSNorm call: one weight per feature. Returns `(rows, features)`.
pub fn check_rms_norm<T: Tensor>(x: &T, weight: &T) -> Result<(usize, usize)> {
    let (rows, n) = x.shape_matrix();
    if weight.shape().numel() != n {
        return Err(Error::shape(
            "rms_norm weight",
            format!("[{n}]"),
            weight.shape(),
        ));
    }
    Ok((rows, n))
}

/// Checks an RMSNorm backward: `dy` shaped as `x`, one saved `1/rms` per row.
pub fn check_rms_norm_backward<T: Tensor>(
    x: &T,
    weight: &T,
    inv_rms: &T,
    dy: &T,
) -> Result<(usize, usize)> {
    let (rows, n) = check_rms_norm(x, weight)?;
    if dy.shape_dims() != x.shape_dims() || inv_rms.shape().numel() != rows {
        return Err(Error::shape(
            "rms_norm_backward dy / saved 1/rms",
            format!("{:?} and [{rows}]", x.shape_dims()),
            dy.shape(),
        ));
    }
    Ok((rows, n))
}

/// Checks a rotary call (`op` names it): `cos` and `sin` `[rows, d]` for `x`'s matrix
/// view, `d` even. Returns `(rows, d)`.
pub fn check_rotary<T: Tensor>(op: &str, x: &T, cos: &T, sin: &T) -> Result<(usize, usize)> {
    let (rows, d) = x.shape_matrix();
    if !d.is_multiple_of(2) || cos.shape().dims() != [rows, d] || sin.shape().dims() != [rows, d] {
        return Err(Error::shape(
            format!("{op} cos/sin"),
            format!("[{rows}, {d}] each, with an even head size"),
            cos.shape(),
        ));
    }
    Ok((rows, d))
}

/// Checks a cross-entropy call: `[rows, vocab]` logits, one target per row, each within
/// the vocabulary. Returns `(rows, vocab)`.
pub fn check_cross_entropy<T: Tensor>(
    logits: &T,
    targets: &[Option<usize>],
) -> Result<(usize, usize)> {
    let (rows, vocab) = logits.shape_matrix();
    if targets.len() != rows {
        return Err(Error::shape(
            "cross_entropy targets",
            format!("one per logits row ({rows})"),
            &crate::Shape::new(&[targets.len()]),
        ));
    }
    if let Some((r, t)) = targets
        .iter()
        .enumerate()
        .find_map(|(r, t)| t.filter(|&t| t >= vocab).map(|t| (r, t)))
    {
        return Err(Error::state(
            "cross_entropy",
            format!("target {t} of row {r} is outside the vocabulary of {vocab} logits"),
        ));
    }
    Ok((rows, vocab))
}

/// Checks an embedding backward: one `d_out` row per id, every id below `vocab`.
/// Returns the hidden size.
pub fn check_embedding_backward<T: Tensor>(
    d_out: &T,
    ids: &[usize],
    vocab: usize,
) -> Result<usize> {
    let (rows, hidden) = d_out.shape_matrix();
    if rows != ids.len() {
        return Err(Error::shape(
            "embedding_backward d_out",
            format!("one row per id ({})", ids.len()),
            d_out.shape(),
        ));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i >= vocab) {
        return Err(Error::state(
            "embedding_backward",
            format!("id {bad} is outside the table of {vocab} rows"),
        ));
    }
    Ok(hidden)
}

/// Positions of `ids` grouped so that no round holds an id twice: round `k` lists, in
/// order, the positions of each id's `k`-th occurrence.
fn occurrence_rounds(ids: &[usize]) -> Vec<Vec<usize>> {
    let mut seen = std::collections::HashMap::new();
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for (pos, id) in ids.iter().enumerate() {
        let k = seen.entry(*id).or_insert(0usize);
        if rounds.len() == *k {
            rounds.push(Vec::new());
        }
        rounds[*k].push(pos);
        *k += 1;
    }
    rounds
}
