//! Layer-level operations with default implementations over the [`Backend`](crate::Backend)
//! primitives. A backend takes the defaults with an empty `impl` or overrides a method with
//! a fused kernel; results must match the defaults within the tolerances of the
//! cross-backend test suite.

mod attention;
mod attention_rows;
mod decoder;
mod lora;
mod optim;
mod task_merge;

pub use attention::{
    AttentionMask, AttentionShape, DenseMask, MASKED, attention_backward, attention_forward,
    check_attention, check_attention_backward, dense_mask_host,
};
pub use attention_rows::{
    RowsShape, attention_rows_backward, attention_rows_forward, check_attention_rows,
    swap_middle_axes,
};
pub use decoder::{
    DecoderOps, RowOrCol, check_cross_entropy, check_embedding_backward, check_rms_norm,
    check_rms_norm_backward, check_rotary,
};
pub use lora::{LoraGrads, LoraOps, WeightedFactors};
pub use optim::{AdamHyper, OptimOps, SgdHyper};
pub use task_merge::{MajoritySign, TaskMerge, TaskMethod};
