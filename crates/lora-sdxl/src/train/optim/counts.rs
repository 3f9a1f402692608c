//! Per-parameter update counts, torch's `state["step"]`: an optimizer skips
//! a parameter without a gradient (a module that module dropout left out
//! of a whole step), and that parameter's count stays, so its next bias
//! correction (AdamW) or relative step and β₂ (Adafactor) follow its own
//! updates, as in `torch.optim.AdamW` and transformers' `Adafactor`.

use tch::Tensor;

/// One count per parameter, next to the optimizer's own step count.
#[derive(Debug, Clone)]
pub(crate) struct StepCounts(Vec<u64>);

impl StepCounts {
    /// `n` parameters, none updated yet.
    pub fn new(n: usize) -> Self {
        Self(vec![0; n])
    }

    /// Parameter `i` takes an update: its count after it.
    pub fn advance(&mut self, i: usize) -> u64 {
        self.0[i] += 1;
        self.0[i]
    }

    /// The counts as a state tensor `{prefix}.step_counts`, written only
    /// when some parameter was skipped (every count is `steps` otherwise,
    /// and states stay as they were without module dropout).
    pub fn state_tensor(&self, prefix: &str, steps: u64) -> Option<(String, Tensor)> {
        self.0.iter().any(|&c| c != steps).then(|| {
            let counts: Vec<i64> = self.0.iter().map(|&c| c as i64).collect();
            (format!("{prefix}.step_counts"), Tensor::from_slice(&counts))
        })
    }

    /// Restores [`Self::state_tensor`]; without one every count is `steps`.
    pub fn load(
        &mut self,
        prefix: &str,
        get: &dyn Fn(&str) -> Option<Tensor>,
        steps: u64,
    ) -> Result<(), String> {
        let name = format!("{prefix}.step_counts");
        match get(&name) {
            None => self.0.iter_mut().for_each(|c| *c = steps),
            Some(t) => {
                let counts =
                    Vec::<i64>::try_from(t.flatten(0, -1)).map_err(|e| format!("{name}: {e}"))?;
                if counts.len() != self.0.len() || counts.iter().any(|&c| c < 0) {
                    return Err(format!(
                        "{name}: {} counts for {} parameters",
                        counts.len(),
                        self.0.len()
                    ));
                }
                self.0 = counts.into_iter().map(|c| c as u64).collect();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_saved_only_when_a_parameter_was_skipped() {
        let mut c = StepCounts::new(3);
        for i in 0..3 {
            c.advance(i);
        }
        assert!(c.state_tensor("adamw.unet", 1).is_none());
        assert_eq!(c.advance(0), 2); // 1 and 2 skipped at step 2
        let (name, t) = c.state_tensor("adamw.unet", 2).unwrap();
        assert_eq!(name, "adamw.unet.step_counts");
        let mut back = StepCounts::new(3);
        back.load("adamw.unet", &|k| (k == name).then(|| t.copy()), 2)
            .unwrap();
        assert_eq!(back.0, vec![2, 1, 1]);
        back.load("adamw.unet", &|_| None, 7).unwrap();
        assert_eq!(back.0, vec![7, 7, 7]);
        let short = Tensor::from_slice(&[1i64]);
        let e = back
            .load("adamw.unet", &|_| Some(short.copy()), 2)
            .unwrap_err();
        assert!(e.contains("1 counts for 3 parameters"), "{e}");
    }
}
