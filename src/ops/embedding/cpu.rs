//! f64 reference for the embedding, also its CPU backend; the backward follows the grouping of
//! tokens by id of [`crate::tokens::group_by_id`], as the GPU does.

pub use crate::tokens::{group_by_id, Groups};

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
