//! f64 reference for the embedding, also its CPU backend, and the grouping of tokens by id that
//! both backends' backward follows.

/// Tokens grouped by id: `ids` the distinct ids in increasing order, `offsets` (one more than
/// `ids`) delimiting each id's tokens in `rows`, in token order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Groups {
    pub ids: Vec<i32>,
    pub offsets: Vec<i32>,
    pub rows: Vec<i32>,
}

/// Groups token indices by id: a stable sort of the token indices by id, O(tokens log tokens)
/// whatever the vocabulary. Every id must be in `0..2^31` and there must be fewer than 2^31
/// tokens (the callers check both).
pub fn group_by_id(ids: &[i32]) -> Groups {
    let mut rows: Vec<i32> = (0..ids.len() as i32).collect();
    rows.sort_by_key(|&r| ids[r as usize]);
    let mut distinct = Vec::new();
    let mut offsets = vec![0i32];
    for (k, &r) in rows.iter().enumerate() {
        let id = ids[r as usize];
        if distinct.last() != Some(&id) {
            if k > 0 {
                offsets.push(k as i32);
            }
            distinct.push(id);
        }
    }
    if !rows.is_empty() {
        offsets.push(rows.len() as i32);
    }
    Groups { ids: distinct, offsets, rows }
}

/// Rows of `table` (`dim` wide) at `ids`.
pub fn forward(table: &[f64], ids: &[i32], dim: usize) -> Vec<f64> {
    ids.iter().flat_map(|&id| table[id as usize * dim..][..dim].iter().copied()).collect()
}

/// `dtable[v] += sum of dout rows of id v`, each id's rows in token order.
pub fn backward(dtable: &mut [f64], groups: &Groups, dout: &[f64], dim: usize) {
    for (u, &id) in groups.ids.iter().enumerate() {
        let mut sum = vec![0.0; dim];
        for &r in &groups.rows[groups.offsets[u] as usize..groups.offsets[u + 1] as usize] {
            for (s, d) in sum.iter_mut().zip(&dout[r as usize * dim..][..dim]) {
                *s += d;
            }
        }
        for (t, s) in dtable[id as usize * dim..][..dim].iter_mut().zip(sum) {
            *t += s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_is_stable_and_complete() {
        let g = group_by_id(&[3, 1, 3, 0, 1, 3]);
        assert_eq!(g.ids, vec![0, 1, 3]);
        assert_eq!(g.offsets, vec![0, 1, 3, 6]);
        assert_eq!(g.rows, vec![3, 1, 4, 0, 2, 5]);
        assert_eq!(group_by_id(&[]), Groups { ids: vec![], offsets: vec![0], rows: vec![] });
    }
}
