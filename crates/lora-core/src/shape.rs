//! Tensor shapes and the matrix view that every GEMM uses.

use std::fmt;

/// The dimensions of a tensor, outermost first (row-major).
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(pub Vec<usize>);

impl Shape {
    /// Build a shape from its dimensions.
    pub fn new(dims: &[usize]) -> Self {
        Shape(dims.to_vec())
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }

    /// The last dimension (features), or 1 for a scalar.
    pub fn last(&self) -> usize {
        self.0.last().copied().unwrap_or(1)
    }

    /// The matrix view `[rows, cols]`: all leading dimensions flattened into rows,
    /// the last dimension as columns. This is how a linear layer treats `[batch, seq, in]`
    /// inputs, exactly like `torch.nn.Linear`.
    pub fn as_matrix(&self) -> (usize, usize) {
        let cols = self.last();
        let rows = self
            .numel()
            .checked_div(cols)
            .unwrap_or_else(|| self.0.iter().rev().skip(1).product());
        (rows, cols)
    }

    /// The same shape with its last dimension replaced.
    pub fn with_last(&self, last: usize) -> Shape {
        let mut dims = self.0.clone();
        match dims.last_mut() {
            Some(d) => *d = last,
            None => dims.push(last),
        }
        Shape(dims)
    }
}

impl From<&[usize]> for Shape {
    fn from(dims: &[usize]) -> Self {
        Shape(dims.to_vec())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(dims: [usize; N]) -> Self {
        Shape(dims.to_vec())
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_view_flattens_leading_dims() {
        assert_eq!(Shape::from([2, 3, 4]).as_matrix(), (6, 4));
        assert_eq!(Shape::from([5]).as_matrix(), (1, 5));
        assert_eq!(Shape::from([0, 4]).as_matrix(), (0, 4));
        assert_eq!(Shape::from([3, 0]).as_matrix(), (3, 0));
        assert_eq!(format!("{}", Shape::from([2, 3])), "[2, 3]");
    }
}
