//! What a source believes about one proxy, and the draw the choice makes
//! from it: a Beta posterior on the chance that the proxy works for the
//! source, from recency-discounted counts, and Thompson sampling.
//!
//! Each feedback first multiplies both counts by `discount`, then adds one
//! to the success or failure count, so the posterior weighs about the last
//! `1 / (1 - discount)` reports of the proxy: a proxy that stops working
//! sinks after a few failures however long it worked. The prior is Beta(1,
//! 1): a proxy the source never tried draws uniformly, so untried proxies
//! are explored in proportion to their chance of beating the known ones.
//! Thompson sampling (draw one value from each eligible proxy's posterior,
//! take the highest) spreads load over the proxies that work instead of
//! piling onto a few, and explores exactly as much as the doubt warrants.

/// Discounted report counts of one (source, proxy).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Posterior {
    pub successes: f32,
    pub failures: f32,
}

impl Posterior {
    /// The posterior after one more report.
    pub fn update(self, success: bool, discount: f32) -> Posterior {
        let (s, f) = (self.successes * discount, self.failures * discount);
        if success {
            Posterior {
                successes: s + 1.0,
                failures: f,
            }
        } else {
            Posterior {
                successes: s,
                failures: f + 1.0,
            }
        }
    }

    /// The posterior mean: the estimated chance that the proxy works.
    pub fn mean(self) -> f32 {
        (self.successes + 1.0) / (self.successes + self.failures + 2.0)
    }

    /// One Thompson draw from Beta(successes + 1, failures + 1).
    pub fn draw(self, rng: &mut fastrand::Rng) -> f32 {
        if self.successes == 0.0 && self.failures == 0.0 {
            return rng.f32();
        }
        let x = gamma(self.successes + 1.0, rng);
        let y = gamma(self.failures + 1.0, rng);
        if x + y <= 0.0 {
            return 0.5;
        }
        x / (x + y)
    }

    /// The posterior of a source that knew only the counts (an old
    /// snapshot): the counts scaled down to the discount's memory.
    pub fn from_counts(successes: u64, failures: u64, discount: f32) -> Posterior {
        let memory = 1.0 / (1.0 - discount.min(0.999));
        let total = (successes + failures) as f32;
        let scale = if total > memory { memory / total } else { 1.0 };
        Posterior {
            successes: successes as f32 * scale,
            failures: failures as f32 * scale,
        }
    }

    /// A key that orders posteriors by their mean, for the source's index.
    pub fn key(self) -> u32 {
        (self.mean().clamp(0.0, 1.0) * (u32::MAX >> 1) as f32) as u32
    }
}

/// A Gamma(shape, 1) draw for shape ≥ 1 (Marsaglia and Tsang, 2000), with a
/// standard normal from the sum of four uniforms (variance matched): the
/// tails are cut at 3.5 σ, which a bandit's draw does not miss, and it costs
/// no logarithm or trigonometry in the common case.
fn gamma(shape: f32, rng: &mut fastrand::Rng) -> f32 {
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    for _ in 0..16 {
        let x = normal(rng);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u = rng.f32();
        let x2 = x * x;
        if u < 1.0 - 0.0331 * x2 * x2 || u.ln() < 0.5 * x2 + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
    d
}

fn normal(rng: &mut fastrand::Rng) -> f32 {
    // Four uniforms sum to a mean of 2 and a variance of 1/3.
    let sum = rng.f32() + rng.f32() + rng.f32() + rng.f32();
    (sum - 2.0) * 1.732_050_8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_of_draws(posterior: Posterior, n: usize) -> f32 {
        let mut rng = fastrand::Rng::with_seed(5);
        (0..n).map(|_| posterior.draw(&mut rng)).sum::<f32>() / n as f32
    }

    #[test]
    fn draws_center_on_the_posterior_mean() {
        for (s, f) in [(0.0, 0.0), (9.0, 1.0), (1.0, 4.0), (30.0, 0.0)] {
            let posterior = Posterior {
                successes: s,
                failures: f,
            };
            let drawn = mean_of_draws(posterior, 20_000);
            assert!(
                (drawn - posterior.mean()).abs() < 0.01,
                "{s}/{f}: drawn {drawn}, mean {}",
                posterior.mean()
            );
        }
    }

    #[test]
    fn draws_stay_in_the_unit_interval() {
        let mut rng = fastrand::Rng::with_seed(9);
        for (s, f) in [(0.0, 10.0), (10.0, 0.0), (0.3, 0.1)] {
            let posterior = Posterior {
                successes: s,
                failures: f,
            };
            for _ in 0..10_000 {
                let x = posterior.draw(&mut rng);
                assert!((0.0..=1.0).contains(&x), "{x}");
            }
        }
    }

    #[test]
    fn a_proxy_that_stops_working_sinks_within_a_few_failures() {
        let mut posterior = Posterior::default();
        for _ in 0..200 {
            posterior = posterior.update(true, 0.9);
        }
        assert!(posterior.mean() > 0.9);
        for _ in 0..3 {
            posterior = posterior.update(false, 0.9);
        }
        // Below an untried proxy's 0.5 after three failures, in spite of
        // 200 successes before.
        assert!(posterior.mean() < 0.75, "{}", posterior.mean());
        for _ in 0..5 {
            posterior = posterior.update(false, 0.9);
        }
        assert!(posterior.mean() < 0.5, "{}", posterior.mean());
    }

    #[test]
    fn old_counts_fit_in_the_discounts_memory() {
        let posterior = Posterior::from_counts(900, 100, 0.9);
        assert!((posterior.successes + posterior.failures - 10.0).abs() < 1e-3);
        assert!((posterior.mean() - 10.0 / 12.0).abs() < 1e-3);
        assert_eq!(
            Posterior::from_counts(2, 1, 0.9),
            Posterior {
                successes: 2.0,
                failures: 1.0
            }
        );
    }

    #[test]
    fn keys_order_by_mean() {
        let good = Posterior {
            successes: 5.0,
            failures: 0.0,
        };
        let bad = Posterior {
            successes: 0.0,
            failures: 5.0,
        };
        assert!(good.key() > Posterior::default().key());
        assert!(Posterior::default().key() > bad.key());
    }
}
