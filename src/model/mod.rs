//! Models assembled from the layers of [`crate::nn`] (reserved; none yet). Models depend on
//! [`crate::nn`], [`crate::ops`] and the core modules; nothing below depends on them.
