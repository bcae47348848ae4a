//! A multi-layer perceptron with PyTorch `nn.Sequential` naming.

use lora_core::rng::{self, RngState};
use lora_core::{
    DenseLinear, Error, LoraLinear, LoraOps, Mode, Model, ParamGrad, Result, RowAdapter, UnaryOp,
};

/// `Linear -> act -> Linear -> act -> ... -> Linear`, named like
/// `nn.Sequential(Linear, ReLU, Linear, ...)` in PyTorch: the linear layers are
/// `layers.0`, `layers.2`, `layers.4`, ... (the activations take the odd indices), so that
/// adapter keys match what PEFT writes for the same PyTorch module.
#[derive(Debug)]
pub struct Mlp<B: LoraOps> {
    layers: Vec<LoraLinear<B>>,
    activation: UnaryOp,
    /// Pre-activation outputs of every hidden layer from the last training forward.
    saved_pre: Vec<B::Tensor>,
}

/// Full fine-tuning gradients of one linear layer: `(dW, db)`.
pub type DenseGrads<T> = (T, Option<T>);

impl<B: LoraOps> Mlp<B> {
    /// A new MLP with layer widths `sizes` (`[in, hidden..., out]`), initialised as
    /// `nn.Linear` does (weights and biases U(-1/√in, 1/√in)) from the shared generator.
    pub fn new(backend: &B, sizes: &[usize], activation: UnaryOp, seed: u64) -> Result<Self> {
        if sizes.len() < 2 || sizes.contains(&0) {
            return Err(Error::config(
                "Mlp",
                "sizes",
                format!("{sizes:?}"),
                "needs at least input and output widths, all non-zero",
            ));
        }
        if !matches!(activation, UnaryOp::Relu | UnaryOp::Gelu | UnaryOp::Tanh) {
            return Err(Error::config(
                "Mlp",
                "activation",
                format!("{activation:?}"),
                "must be Relu, Gelu or Tanh",
            ));
        }
        let mut layers = Vec::with_capacity(sizes.len() - 1);
        for (i, pair) in sizes.windows(2).enumerate() {
            let (in_f, out_f) = (pair[0], pair[1]);
            let name = format!("layers.{}", 2 * i);
            let bound = 1.0 / (in_f as f32).sqrt();
            let mut w = vec![0.0; out_f * in_f];
            let mut b = vec![0.0; out_f];
            rng::uniform(
                RngState::new(seed, rng::stream_id(&name, "weight")),
                -bound,
                bound,
                &mut w,
            );
            rng::uniform(
                RngState::new(seed, rng::stream_id(&name, "bias")),
                -bound,
                bound,
                &mut b,
            );
            let dense = DenseLinear::new(
                backend.from_host(&w, &[out_f, in_f])?,
                Some(backend.from_host(&b, &[out_f])?),
            )?;
            layers.push(LoraLinear::new(name, Box::new(dense)));
        }
        Ok(Mlp {
            layers,
            activation,
            saved_pre: Vec::new(),
        })
    }

    /// Backward for full fine-tuning: gradients of every layer's weight and bias (used to
    /// pretrain the base model, and as the baseline LoRA is compared against).
    pub fn backward_full(
        &mut self,
        backend: &B,
        dy: &B::Tensor,
    ) -> Result<Vec<DenseGrads<B::Tensor>>> {
        let mut grads = Vec::with_capacity(self.layers.len());
        let mut g = dy.clone();
        let last = self.layers.len() - 1;
        for i in (0..self.layers.len()).rev() {
            if i < last {
                g = self.activation_backward(backend, i, &g)?;
            }
            let (dx, d_w, d_b) = self.layers[i].backward_full(backend, &g)?;
            grads.push((d_w, d_b));
            g = dx;
        }
        grads.reverse();
        Ok(grads)
    }

    /// Pairs every base weight and bias with its gradient from [`Mlp::backward_full`].
    pub fn dense_params_and_grads<'a>(
        &'a mut self,
        grads: &'a [DenseGrads<B::Tensor>],
    ) -> Result<Vec<ParamGrad<'a, B::Tensor>>> {
        let mut out = Vec::new();
        for (layer, (d_w, d_b)) in self.layers.iter_mut().zip(grads) {
            let name = layer.name().to_string();
            let dense = layer
                .base_mut()
                .as_dense_mut()
                .ok_or_else(|| Error::state(name, "full fine-tuning needs a dense base"))?;
            let (w, b) = dense.params_mut();
            out.push(ParamGrad {
                param: w,
                grad: d_w,
            });
            if let (Some(b), Some(d_b)) = (b, d_b) {
                out.push(ParamGrad {
                    param: b,
                    grad: d_b,
                });
            }
        }
        Ok(out)
    }

    /// Backward through the activation after hidden layer `i`.
    fn activation_backward(&self, backend: &B, i: usize, g: &B::Tensor) -> Result<B::Tensor> {
        let pre = self.saved_pre.get(i).ok_or_else(|| {
            Error::state("Mlp", "backward called without a forward in training mode")
        })?;
        backend.unary_backward(self.activation, pre, g)
    }

    /// The activation between layers.
    pub fn activation(&self) -> UnaryOp {
        self.activation
    }
}

impl<B: LoraOps> Model<B> for Mlp<B> {
    fn forward(&mut self, backend: &B, x: &B::Tensor, mode: Mode) -> Result<B::Tensor> {
        self.saved_pre.clear();
        let last = self.layers.len() - 1;
        let mut h = x.clone();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            if i < last {
                let (pre, post) = layer.forward_activated(backend, &h, mode, self.activation)?;
                h = post;
                if mode == Mode::Train {
                    self.saved_pre.push(pre);
                }
            } else {
                h = layer.forward(backend, &h, mode)?;
            }
        }
        Ok(h)
    }

    fn forward_mixed(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        rows: &[RowAdapter],
    ) -> Result<B::Tensor> {
        self.saved_pre.clear();
        let last = self.layers.len() - 1;
        let mut h = x.clone();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let pre = layer.forward_mixed(backend, &h, rows)?;
            h = if i < last {
                backend.unary(self.activation, &pre)?
            } else {
                pre
            };
        }
        Ok(h)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> Result<()> {
        let last = self.layers.len() - 1;
        let mut g = dy.clone();
        for i in (1..self.layers.len()).rev() {
            if i < last {
                g = self.activation_backward(backend, i, &g)?;
            }
            g = self.layers[i].backward(backend, &g)?;
        }
        // The model's input is data: the first layer's input gradient is never used.
        if last > 0 {
            g = self.activation_backward(backend, 0, &g)?;
        }
        self.layers[0].backward_params(backend, &g)
    }

    fn linears(&self) -> Vec<&LoraLinear<B>> {
        self.layers.iter().collect()
    }

    fn linears_mut(&mut self) -> Vec<&mut LoraLinear<B>> {
        self.layers.iter_mut().collect()
    }
}
