//! The surrogate of the loss over mixing weights that the oracle-efficient SeWA optimises:
//! on the plane Σα = 1, F̂(α) = uᵀα + ½ αᵀMα with M = −½ Σ_g a_g D_g + R, where D_g holds the
//! members' squared distances ‖w_i − w_j‖² over one tensor group and one band of step gaps
//! (`banded`: pairs of neighbours, of members 2–3 apart, 4–7 apart, …), u the linear term,
//! a_g one curvature per group and band, and R a ridge-penalised symmetric residual.
//! For L(w) = ½ (w − t)ᵀH(w − t), M_ij = −½ ‖w_i − w_j‖²_H exactly; one curvature per band
//! lets ‖·‖²_H / ‖·‖² differ between neighbours (who differ along sharp, noisy directions) and
//! distant members (who differ along the flat drift of training), which one isotropic
//! curvature cannot: it over-predicts the gain of contiguous runs on noisy trajectories.
//! Fitted by least squares on every oracle call: the loss (one equation) and, with a gradient,
//! ∂F/∂α_i = ⟨G, w_i⟩ known up to a constant (the dot products are taken about the mixed point),
//! so only its differences are used (K − 1 more equations). Pure numbers: no oracle, no files.

/// Split each group's distance matrix by the gap |i − j| between members (window order) into
/// bands [1], [2, 3], [4, 7], [8, 15], … (at most `max_bands`, the last open-ended): one
/// matrix per (group, band), each zero outside its band.
pub fn banded(dist: &[Vec<Vec<f64>>], max_bands: usize) -> Vec<Vec<Vec<f64>>> {
    let band = |gap: usize| (usize::BITS - gap.leading_zeros()) as usize - 1;
    let n = dist.first().map_or(0, Vec::len);
    let bands = if n < 2 { 1 } else { (band(n - 1) + 1).min(max_bands.max(1)) };
    let mut out = Vec::with_capacity(dist.len() * bands);
    for d in dist {
        for b in 0..bands {
            let m = (0..n)
                .map(|i| {
                    (0..n)
                        .map(|j| {
                            let gap = i.abs_diff(j);
                            let on = gap > 0 && band(gap).min(bands - 1) == b;
                            if on { d[i][j] } else { 0.0 }
                        })
                        .collect()
                })
                .collect();
            out.push(m);
        }
    }
    out
}

/// One oracle call as the surrogate sees it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    /// Mixing weights over the window, summing to 1.
    pub alpha: Vec<f64>,
    pub loss: f64,
    /// `⟨G, w_i − c⟩` per member (any common offset; `None`: unknown, e.g. a newcomer of a
    /// warm start); empty for a forward-only call.
    pub grad: Vec<Option<f64>>,
}

/// The fitted surrogate.
#[derive(Clone, Debug)]
pub struct Model {
    pub u: Vec<f64>,
    /// Symmetric K×K.
    pub m: Vec<Vec<f64>>,
    /// Per-group curvature a_g (reported).
    pub curvature: Vec<f64>,
}

impl Model {
    /// F̂(α).
    pub fn value(&self, alpha: &[f64]) -> f64 {
        let quad: f64 = (0..alpha.len())
            .map(|i| alpha[i] * self.m[i].iter().zip(alpha).map(|(m, a)| m * a).sum::<f64>())
            .sum();
        self.u.iter().zip(alpha).map(|(u, a)| u * a).sum::<f64>() + 0.5 * quad
    }

    /// ∇F̂(α) = u + Mα (any offset along 1 is immaterial on the plane).
    pub fn grad(&self, alpha: &[f64]) -> Vec<f64> {
        (0..alpha.len())
            .map(|i| self.u[i] + self.m[i].iter().zip(alpha).map(|(m, a)| m * a).sum::<f64>())
            .collect()
    }

    /// F̂ of the uniform average of `set`.
    pub fn subset(&self, set: &[usize]) -> f64 {
        let k = set.len() as f64;
        let lin: f64 = set.iter().map(|&i| self.u[i]).sum::<f64>() / k;
        let quad: f64 = set.iter().map(|&i| set.iter().map(|&j| self.m[i][j]).sum::<f64>()).sum();
        lin + 0.5 * quad / (k * k)
    }
}

/// How the fit weighs its equations.
pub struct FitOptions {
    /// Ridge on R relative to the data's own scale (larger: closer to the structured model).
    pub ridge: f64,
    /// Whether R is fitted at all (off for very large windows: K(K+1)/2 unknowns).
    pub residual: bool,
    /// Weight of gradient equations (a step of `grad_scale` in α, in loss units).
    pub grad_scale: f64,
}

/// Unknowns: u (K), a (G), R's upper triangle.
struct Layout {
    k: usize,
    g: usize,
    residual: bool,
}

impl Layout {
    fn len(&self) -> usize {
        self.k + self.g + if self.residual { self.k * (self.k + 1) / 2 } else { 0 }
    }
    fn tri(&self, i: usize, j: usize) -> usize {
        let (i, j) = (i.min(j), i.max(j));
        self.k + self.g + i * self.k - i * (i + 1) / 2 + j
    }
}

/// αᵀDα.
fn quad_form(d: &[Vec<f64>], alpha: &[f64]) -> f64 {
    (0..alpha.len())
        .map(|i| alpha[i] * d[i].iter().zip(alpha).map(|(x, a)| x * a).sum::<f64>())
        .sum()
}

fn value_row(l: &Layout, dist: &[Vec<Vec<f64>>], alpha: &[f64]) -> Vec<f64> {
    let mut row = vec![0.0; l.len()];
    row[..l.k].copy_from_slice(alpha);
    for (g, d) in dist.iter().enumerate() {
        row[l.k + g] = -0.25 * quad_form(d, alpha);
    }
    if l.residual {
        for i in 0..l.k {
            for j in i..l.k {
                let c = if i == j { 0.5 } else { 1.0 };
                row[l.tri(i, j)] = c * alpha[i] * alpha[j];
            }
        }
    }
    row
}

/// The model's ∂F̂/∂α_m as a row over the unknowns.
fn grad_row(l: &Layout, dist: &[Vec<Vec<f64>>], alpha: &[f64], m: usize) -> Vec<f64> {
    let mut row = vec![0.0; l.len()];
    row[m] = 1.0;
    for (g, d) in dist.iter().enumerate() {
        row[l.k + g] = -0.5 * d[m].iter().zip(alpha).map(|(x, a)| x * a).sum::<f64>();
    }
    if l.residual {
        for (j, a) in alpha.iter().enumerate() {
            row[l.tri(m, j)] += a;
        }
    }
    row
}

/// Normal equations, accumulated row by row.
struct Normal {
    a: Vec<f64>,
    b: Vec<f64>,
    p: usize,
}

impl Normal {
    fn add(&mut self, row: &[f64], y: f64, w: f64) {
        let w2 = w * w;
        for (i, ri) in row.iter().enumerate().filter(|(_, r)| **r != 0.0) {
            self.b[i] += w2 * ri * y;
            let line = &mut self.a[i * self.p..(i + 1) * self.p];
            for (a, rj) in line.iter_mut().zip(row) {
                *a += w2 * ri * rj;
            }
        }
    }
}

/// Fit the model to `points` over a window of `k` members; `dist` holds one K×K distance
/// matrix per tensor group. Vertex losses (one-member points) pin u; the curvatures and R
/// follow from the rest. Always returns a model (the ridge keeps the system definite).
pub fn fit(k: usize, points: &[Point], dist: &[Vec<Vec<f64>>], opts: &FitOptions) -> Model {
    let l = Layout { k, g: dist.len(), residual: opts.residual };
    let p = l.len();
    let mut n = Normal { a: vec![0.0; p * p], b: vec![0.0; p], p };
    // Values carry what the selection is judged on: weigh them as much as a gradient's K rows.
    let value_weight = (k as f64).sqrt();
    for pt in points {
        n.add(&value_row(&l, dist, &pt.alpha), pt.loss, value_weight);
        let known: Vec<usize> = (0..pt.grad.len()).filter(|&i| pt.grad[i].is_some()).collect();
        if known.len() < 2 {
            continue;
        }
        let rows: Vec<Vec<f64>> = known.iter().map(|&m| grad_row(&l, dist, &pt.alpha, m)).collect();
        let ys: Vec<f64> = known.iter().map(|&m| pt.grad[m].unwrap_or(0.0)).collect();
        let inv = 1.0 / known.len() as f64;
        let mean_row: Vec<f64> =
            (0..p).map(|c| rows.iter().map(|r| r[c]).sum::<f64>() * inv).collect();
        let mean_y = ys.iter().sum::<f64>() * inv;
        for (r, y) in rows.iter().zip(&ys) {
            let centred: Vec<f64> = r.iter().zip(&mean_row).map(|(a, b)| a - b).collect();
            n.add(&centred, y - mean_y, opts.grad_scale);
        }
    }
    regularise(&mut n, &l, opts.ridge);
    let theta = solve(&mut n.a, &n.b, p);
    model_from(&l, dist, &theta)
}

/// Ridge on R relative to the mean diagonal of its block; a tiny one elsewhere keeps the
/// system definite when a member has no data yet.
fn regularise(n: &mut Normal, l: &Layout, ridge: f64) {
    let p = n.p;
    let diag: Vec<f64> = (0..p).map(|i| n.a[i * p + i]).collect();
    let mean = |r: std::ops::Range<usize>| {
        let len = r.len().max(1) as f64;
        diag[r].iter().sum::<f64>() / len
    };
    let scale = mean(0..p).max(1e-300);
    let base = l.k + l.g;
    let r_scale = if p > base { mean(base..p).max(1e-12 * scale) } else { 0.0 };
    for i in 0..p {
        let lambda = if i >= base { ridge * r_scale + 1e-12 * scale } else { 1e-9 * scale };
        n.a[i * p + i] += lambda;
    }
}

fn model_from(l: &Layout, dist: &[Vec<Vec<f64>>], theta: &[f64]) -> Model {
    let k = l.k;
    let curvature = theta[k..k + l.g].to_vec();
    let mut m = vec![vec![0.0; k]; k];
    for i in 0..k {
        for j in 0..k {
            let d: f64 = dist.iter().zip(&curvature).map(|(d, a)| a * d[i][j]).sum();
            let r = if l.residual { theta[l.tri(i, j)] } else { 0.0 };
            m[i][j] = -0.5 * d + r;
        }
    }
    Model { u: theta[..k].to_vec(), m, curvature }
}

/// Solve the symmetric positive definite system `a x = b` (Cholesky, with growing jitter if
/// rounding made it indefinite).
pub(super) fn solve(a: &mut [f64], b: &[f64], p: usize) -> Vec<f64> {
    let orig = a.to_vec();
    let mut jitter = 0.0;
    for _ in 0..8 {
        a.copy_from_slice(&orig);
        let scale = (0..p).map(|i| orig[i * p + i]).fold(0.0, f64::max).max(1e-300);
        (0..p).for_each(|i| a[i * p + i] += jitter * scale);
        if cholesky(a, p) {
            return substitute(a, b, p);
        }
        jitter = if jitter == 0.0 { 1e-10 } else { jitter * 100.0 };
    }
    vec![0.0; p]
}

/// In-place lower Cholesky factor; false if not positive definite.
fn cholesky(a: &mut [f64], p: usize) -> bool {
    for j in 0..p {
        let mut d = a[j * p + j];
        for k in 0..j {
            d -= a[j * p + k] * a[j * p + k];
        }
        if d <= 0.0 || !d.is_finite() {
            return false;
        }
        let d = d.sqrt();
        a[j * p + j] = d;
        for i in j + 1..p {
            let mut s = a[i * p + j];
            for k in 0..j {
                s -= a[i * p + k] * a[j * p + k];
            }
            a[i * p + j] = s / d;
        }
    }
    true
}

fn substitute(l: &[f64], b: &[f64], p: usize) -> Vec<f64> {
    let mut y = b.to_vec();
    for i in 0..p {
        for k in 0..i {
            y[i] -= l[i * p + k] * y[k];
        }
        y[i] /= l[i * p + i];
    }
    for i in (0..p).rev() {
        for k in i + 1..p {
            y[i] -= l[k * p + i] * y[k];
        }
        y[i] /= l[i * p + i];
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Members on a line in 1-D with L(w) = ½ a (w − t)²: the structured model is exact.
    const A: f64 = 1.7;
    const T: f64 = 0.8;

    fn members() -> Vec<f64> {
        vec![0.0, 1.0, 3.0, -2.0, 0.5]
    }

    /// Loss and `⟨G, w_i − w(α)⟩` of L(w) = ½ A (w − T)² at the mixture `alpha`.
    fn truth(alpha: &[f64]) -> (f64, Vec<f64>) {
        let ws = members();
        let w: f64 = alpha.iter().zip(&ws).map(|(a, w)| a * w).sum();
        let g = A * (w - T);
        (0.5 * A * (w - T).powi(2), ws.iter().map(|wi| g * (wi - w)).collect())
    }

    #[test]
    fn structured_model_is_exact_for_an_isotropic_quadratic() {
        let ws = members();
        let dist =
            vec![ws.iter().map(|x| ws.iter().map(|y| (x - y) * (x - y)).collect()).collect()];
        let f = truth;
        let k = ws.len();
        let mut points = Vec::new();
        for i in 0..k {
            let mut alpha = vec![0.0; k];
            alpha[i] = 1.0;
            points.push(Point { alpha, loss: f(&vec_e(k, i)).0, grad: vec![] });
        }
        let alpha = vec![0.2; k];
        let (loss, g) = f(&alpha);
        points.push(Point { alpha, loss, grad: g.into_iter().map(Some).collect() });
        let opts = FitOptions { ridge: 1e-3, residual: true, grad_scale: 0.2 };
        let model = fit(k, &points, &dist, &opts);
        for set in [vec![0, 1], vec![2, 3, 4], vec![1, 4]] {
            let mut alpha = vec![0.0; k];
            set.iter().for_each(|&i| alpha[i] = 1.0 / set.len() as f64);
            let truth = f(&alpha).0;
            assert!((model.subset(&set) - truth).abs() < 1e-6 * truth.max(1.0), "{set:?}");
            assert!((model.value(&alpha) - truth).abs() < 1e-6 * truth.max(1.0));
        }
        assert!((model.curvature[0] - 1.7).abs() < 1e-4, "{:?}", model.curvature);
    }

    #[test]
    fn bands_split_pairs_by_step_gap_and_sum_back_to_the_whole() {
        let n = 10;
        let d: Vec<Vec<f64>> =
            (0..n).map(|i| (0..n).map(|j| (i as f64 - j as f64).powi(2)).collect()).collect();
        let b = banded(std::slice::from_ref(&d), 4);
        assert_eq!(b.len(), 4, "gaps 1, 2-3, 4-7, 8-9");
        for i in 0..n {
            for j in 0..n {
                let on: Vec<usize> = (0..4).filter(|&x| b[x][i][j] != 0.0).collect();
                let gap = i.abs_diff(j);
                let want = match gap {
                    0 => vec![],
                    1 => vec![0],
                    2..=3 => vec![1],
                    4..=7 => vec![2],
                    _ => vec![3],
                };
                assert_eq!(on, want, "pair ({i}, {j})");
                let total: f64 = (0..4).map(|x| b[x][i][j]).sum();
                assert_eq!(total, d[i][j]);
            }
        }
        assert_eq!(banded(std::slice::from_ref(&d), 2).len(), 2, "the last band is open-ended");
        assert_eq!(banded(&[vec![vec![0.0]]], 4).len(), 1);
    }

    /// The banded family contains the isotropic one: for L(w) = ½ a‖w − t‖² every band fits
    /// the same curvature and the model stays exact.
    #[test]
    fn banded_model_is_exact_for_an_isotropic_quadratic() {
        let ws = members();
        let k = ws.len();
        let d = vec![ws.iter().map(|x| ws.iter().map(|y| (x - y) * (x - y)).collect()).collect()];
        let dist = banded(&d, 4);
        let mut points: Vec<Point> = (0..k)
            .map(|i| Point { alpha: vec_e(k, i), loss: truth(&vec_e(k, i)).0, grad: vec![] })
            .collect();
        for alpha in [vec![0.2; k], vec![0.5, 0.5, 0.0, 0.0, 0.0], vec![0.0, 0.0, 0.0, 0.5, 0.5]] {
            let (loss, g) = truth(&alpha);
            points.push(Point { alpha, loss, grad: g.into_iter().map(Some).collect() });
        }
        let opts = FitOptions { ridge: 1e-3, residual: true, grad_scale: 0.2 };
        let model = fit(k, &points, &dist, &opts);
        for set in [vec![0, 2], vec![1, 3, 4], vec![0, 4]] {
            let mut alpha = vec![0.0; k];
            set.iter().for_each(|&i| alpha[i] = 1.0 / set.len() as f64);
            let t = truth(&alpha).0;
            let got = model.subset(&set);
            assert!(
                (got - t).abs() < 1e-4 * t.max(1.0),
                "{set:?}: {got} vs {t}, {:?}",
                model.curvature
            );
        }
    }

    fn vec_e(k: usize, i: usize) -> Vec<f64> {
        let mut v = vec![0.0; k];
        v[i] = 1.0;
        v
    }
}
