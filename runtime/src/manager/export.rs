//! `image export`: writes a store image as an OCI image layout (a directory or a tar of one),
//! which `image import`, `ctr import` and `skopeo` read back. The work is
//! [`arrakis_image::export`]'s; this maps its errors to the manager's kinds.

use std::path::Path;

use arrakis_image::export::{self, ExportError, ExportedImage};

use super::Manager;
use crate::error::RuntimeError;

impl Manager {
    /// Exports the image `wanted` names (a reference, digest or id) to `dest`: a tar when it
    /// ends in `.tar`, else a new or empty directory. A built image's disk is flattened into
    /// one layer. Blocking: run it off the async threads.
    pub fn export_image(&self, wanted: &str, dest: &Path) -> Result<ExportedImage, RuntimeError> {
        let store = self.image_store()?;
        export::export_image(&store, wanted, dest).map_err(|error| match error {
            ExportError::Store(source) => RuntimeError::Image(source),
            ExportError::DestinationNotEmpty { .. } | ExportError::DestinationExists { .. } => {
                RuntimeError::InvalidArgument {
                    field: "path",
                    message: error.to_string(),
                }
            }
            other => RuntimeError::Io {
                op: "exporting an image to",
                path: dest.to_path_buf(),
                source: std::io::Error::other(crate::agent::error_chain(&other)),
            },
        })
    }
}
