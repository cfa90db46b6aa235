//! Layers built from the ops (reserved; none yet): each layer owns named parameters, has
//! `forward` (keeping what its backward needs), `backward` (adding into parameter gradients)
//! and `step` (one token from a cached state), written out explicitly in the llm.c manner.
//! Layers depend on [`crate::ops`] and the core modules only, never on [`crate::model`].
