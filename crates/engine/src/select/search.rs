//! Baseline subset searches with the same objective as SeWA: `greedy` (a greedy soup), `exhaustive`
//! (every k-subset, the certificate of optimality on small windows) and `random` (k members,
//! seeded). Each returns the chosen set, its loss and a JSON report; none writes files. A long
//! exhaustive search shows a progress bar on a terminal (`meter`).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::oracle::Oracle;
use crate::error::{Error, Result};
use crate::meter::Meter;

/// A search's answer: member indices, the loss of their uniform average, a report.
pub struct Found {
    pub set: Vec<usize>,
    pub loss: f64,
    /// Learned non-uniform weights over the window (soup, twa); `None`: uniform over `set`.
    pub weights: Option<Vec<f64>>,
    pub details: serde_json::Value,
}

/// Greedy soup: rank members by their own loss, then walk that order adding each member whose
/// addition lowers the loss of the uniform average. The soup size is whatever that gives (not k).
pub fn greedy(oracle: &mut Oracle) -> Result<Found> {
    let n = oracle.blend.len();
    let single: Vec<f64> = (0..n).map(|i| oracle.subset(&[i])).collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| single[a].total_cmp(&single[b]).then(a.cmp(&b)));
    let mut set = vec![order[0]];
    let mut loss = single[order[0]];
    for &i in &order[1..] {
        set.push(i);
        let l = oracle.subset(&set)?;
        if l < loss {
            loss = l;
        } else {
            set.pop();
        }
    }
    set.sort_unstable();
    let details = json!({ "member_losses": single, "order": order });
    Ok(Found { set, loss, weights: None, details })
}

/// Number of k-subsets of n, saturating.
pub fn choose(n: usize, k: usize) -> u64 {
    let k = k.min(n - k.min(n));
    let mut c: u128 = 1;
    for i in 0..k {
        c = c * (n - i) as u128 / (i + 1) as u128;
        if c > u64::MAX as u128 {
            return u64::MAX;
        }
    }
    c as u64
}

/// Every k-subset, when there are at most `limit` of them.
pub fn exhaustive(oracle: &mut Oracle, k: usize, limit: u64) -> Result<Found> {
    let n = oracle.blend.len();
    let count = choose(n, k);
    if count > limit {
        return Err(Error::Usage(format!(
            "exhaustive search over C({n},{k}) = {count} subsets exceeds exhaustive_limit = \
             {limit}: raise [select.sewa] exhaustive_limit or use method = \"sewa\""
        )));
    }
    let mut idx: Vec<usize> = (0..k).collect();
    let mut best = (f64::INFINITY, idx.clone());
    let mut meter =
        Meter::new(count, "exhaustive search {wide_bar} {pos}/{len} subsets, eta {eta}");
    for done in 1.. {
        let l = oracle.subset(&idx)?;
        meter.set(done);
        if l < best.0 {
            best = (l, idx.clone());
        }
        // Next combination in lexicographic order.
        let Some(p) = (0..k).rev().find(|&p| idx[p] < n - k + p) else { break };
        idx[p] += 1;
        for q in p + 1..k {
            idx[q] = idx[q - 1] + 1;
        }
    }
    Ok(Found { set: best.1, loss: best.0, weights: None, details: json!({ "subsets": count }) })
}

/// k members uniformly at random without replacement, from `seed`.
pub fn random(oracle: &mut Oracle, k: usize, seed: u64) -> Result<Found> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut set = rand::seq::index::sample(&mut rng, oracle.blend.len(), k).into_vec();
    set.sort_unstable();
    let loss = oracle.subset(&set)?;
    Ok(Found { set, loss, weights: None, details: json!({ "seed": seed }) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn choose_small_and_saturating() {
        assert_eq!(super::choose(20, 5), 15504);
        assert_eq!(super::choose(5, 5), 1);
        assert_eq!(super::choose(5, 0), 1);
        assert_eq!(super::choose(200, 100), u64::MAX);
    }
}
