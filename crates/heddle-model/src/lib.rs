//! heddle-model: tensors and weights behind the [`runner::ModelRunner`] trait.
//! Knows nothing of HTTP; the scheduling decisions come from `heddle-core`.
