//! The embedding's `run` command.

use super::{embedding, embedding_backward};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::registry::{RunArgs, RunCommand};
use crate::tensor::Tensor;
use crate::tokens::TokenIds;

/// The `ids` tensor of the file (stored as floats) as token ids.
pub(crate) fn ids_from(a: &RunArgs, name: &'static str) -> Result<TokenIds> {
    let t = a.required(name)?;
    let ids = t
        .to_f64_vec()?
        .iter()
        .map(|&v| {
            if v.fract() == 0.0 && v.abs() < 16_777_216.0 {
                Ok(v as i32)
            } else {
                Err(Error::invalid(name, "integer ids below 2^24 in magnitude", v.to_string()))
            }
        })
        .collect::<Result<Vec<i32>>>()?;
    TokenIds::new(&ids, t.shape(), a.device)
}

pub const COMMANDS: &[RunCommand] = &[RunCommand {
    name: "embedding",
    main_input: "table",
    options: &[],
    usage: "table (vocab, dim), ids (..) integer-valued -> out (.., dim); with dout also dtable (f32, from zero)",
    run: |a| {
        let (table, ids) = (a.required("table")?, ids_from(a, "ids")?);
        let mut out = vec![("out", embedding(table, &ids)?)];
        if let Some(dout) = a.optional("dout") {
            let mut dtable = Tensor::full(0.0, table.shape(), DType::F32, a.device)?;
            embedding_backward(&mut dtable, &ids, dout)?;
            out.push(("dtable", dtable));
        }
        Ok(out)
    },
}];
