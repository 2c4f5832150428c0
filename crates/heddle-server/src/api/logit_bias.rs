//! OpenAI's `logit_bias`: `{"token id": bias}`, ids as strings, biases in [-100, 100],
//! added to the logits before sampling; -100 bans the token.

use std::sync::Arc;

use serde_json::Value;

use heddle_core::TokenId;

use super::errors::ApiError;

/// The most and least a bias may be.
pub const MAX_BIAS: f64 = 100.0;

/// The (token, bias) pairs of a `logit_bias` object, in id order; ids must be below
/// `vocab_size`. Null or `{}` is no bias.
pub fn logit_bias(
    value: Option<&Value>,
    vocab_size: usize,
) -> Result<Arc<[(TokenId, f32)]>, ApiError> {
    let object = match value {
        None | Some(Value::Null) => return Ok(Arc::new([])),
        Some(Value::Object(object)) => object,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "logit_bias",
                "`logit_bias` must be an object mapping token ids (as strings) to biases.",
            ))
        }
    };
    let mut biases = Vec::with_capacity(object.len());
    for (key, bias) in object {
        let token = key
            .parse::<TokenId>()
            .ok()
            .filter(|&id| (id as usize) < vocab_size)
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "logit_bias",
                    format!(
                        "Invalid key {key:?} in `logit_bias`: keys are token ids below the \
                         model's vocabulary of {vocab_size} tokens."
                    ),
                )
            })?;
        let bias = bias
            .as_f64()
            .filter(|b| (-MAX_BIAS..=MAX_BIAS).contains(b))
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "logit_bias",
                    format!(
                        "Invalid bias for token {key} in `logit_bias`: {bias}; biases are \
                         numbers from -100 to 100."
                    ),
                )
            })?;
        biases.push((token, bias as f32));
    }
    biases.sort_unstable_by_key(|&(token, _)| token);
    // "5" and "05" are one token: refused rather than added twice.
    if let Some(pair) = biases.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(ApiError::invalid_param(
            "logit_bias",
            format!(
                "Token {} appears twice in `logit_bias` (keys that name the same id).",
                pair[0].0
            ),
        ));
    }
    Ok(biases.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_and_biases_are_checked() {
        let parsed = logit_bias(Some(&json!({"7": -100, "3": 2.5})), 10).unwrap();
        assert_eq!(&*parsed, &[(3, 2.5), (7, -100.0)]);
        assert!(logit_bias(Some(&json!({})), 10).unwrap().is_empty());
        assert!(logit_bias(None, 10).unwrap().is_empty());
        for bad in [
            json!({"10": 1}),
            json!({"-1": 1}),
            json!({"x": 1}),
            json!({"1": 100.5}),
            json!({"1": "5"}),
            json!({"5": 1, "05": 2}),
            json!([1]),
        ] {
            let error = logit_bias(Some(&bad), 10).unwrap_err();
            assert_eq!(error.param.as_deref(), Some("logit_bias"), "{bad}");
        }
    }
}
