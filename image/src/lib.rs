//! Image handling for arrakis: turning OCI image layers into a root file system tree and that
//! tree into the ext4 base image a sandbox boots from.
//!
//! Only the local, offline steps live here so far: [`oci`] reads and verifies OCI image layouts,
//! [`unpack`] applies layer tarballs with the OCI whiteout rules, and [`ext4`] packs the
//! resulting directory into a file system image.

pub mod archive;
pub mod blobs;
pub mod context;
pub mod dockerfile;
pub mod export;
pub mod ext4;
pub mod oci;
pub mod registry;
pub mod store;
pub mod unpack;
