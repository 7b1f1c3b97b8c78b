//! Order statistics shared by the stream summary and tune's latency figures.

/// Nearest-rank `p`-th percentile (0 < p <= 100) of ascending `sorted`: the value of rank
/// `ceil(p/100 * n)` (1-based, at least 1), so it is always one of the inputs. `None` where
/// `sorted` is empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    // Integer arithmetic on per-mille ranks avoids float round-off (0.95 * 100 = 95.000...01).
    let per_mille = (p * 10.0).round().max(0.0) as u64;
    let rank = (per_mille * n as u64).div_ceil(1000).clamp(1, n as u64);
    sorted.get(rank as usize - 1).copied()
}

/// `values` sorted ascending with [`f64::total_cmp`].
pub fn sorted(values: impl IntoIterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_is_an_input_and_empty_is_none() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(10.0));
        assert_eq!(percentile(&v, 95.0), Some(19.0));
        assert_eq!(percentile(&v, 99.0), Some(20.0));
        assert_eq!(percentile(&[3.0], 1.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
