//! The Pareto frontier of (latency, accuracy): a point is on it when no other point is at least
//! as fast and at least as accurate and strictly better in one of the two.

/// For each `(cost, value)` pair (lower cost and higher value are better), whether it is on the
/// frontier. Points with identical cost and value are both on it (or both off). Pairs with a NaN
/// are never on it and never dominate.
pub fn frontier(points: &[(f64, f64)]) -> Vec<bool> {
    points
        .iter()
        .map(|&(c, v)| {
            !c.is_nan()
                && !v.is_nan()
                && !points.iter().any(|&(c2, v2)| c2 <= c && v2 >= v && (c2 < c || v2 > v))
        })
        .collect()
}

/// Indices of the frontier points, sorted by cost (then by value, best first).
pub fn frontier_order(points: &[(f64, f64)]) -> Vec<usize> {
    let on = frontier(points);
    let mut idx: Vec<usize> = (0..points.len()).filter(|&i| on[i]).collect();
    idx.sort_by(|&a, &b| {
        points[a].0.total_cmp(&points[b].0).then(points[b].1.total_cmp(&points[a].1))
    });
    idx
}
