//! The image configuration as the build goes: what each instruction leaves behind for the next
//! one and, after the last, what the built image's config says.

use std::collections::{BTreeMap, BTreeSet};

use crate::oci::RunConfig;

/// The image config (and the build-only ARG values) after a step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigState {
    /// ENV variables in the order they were first set (the base image's first); setting one
    /// again replaces its value in place.
    pub env: Vec<(String, String)>,
    /// ARG variables declared after FROM, in declaration order, with their values (`None`: no
    /// build arg and no default, so unset), preceded by the predefined proxy build args that
    /// were given. They are in RUN steps' environment but not in the image config.
    pub args: Vec<(String, Option<String>)>,
    /// The working directory, absolute and normalized; `/` when nothing set it.
    pub workdir: String,
    /// `user[:group]`; `None` when neither the base image nor the Dockerfile set one.
    pub user: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    /// `None` when unset. ENTRYPOINT clears a CMD inherited from the base image (as Docker
    /// does), unless the Dockerfile set CMD earlier.
    pub cmd: Option<Vec<String>>,
    /// `port/proto` keys, proto one of `tcp`, `udp`, `sctp`.
    pub exposed_ports: BTreeSet<String>,
    pub labels: BTreeMap<String, String>,
    /// VOLUME paths as written (substituted); metadata only (the OCI run config type has no field for them yet).
    pub volumes: BTreeSet<String>,
    /// STOPSIGNAL; metadata only, like `volumes`.
    pub stop_signal: Option<String>,
}

impl ConfigState {
    /// The state a build starts from: the base image's config.
    pub fn from_base(base: &RunConfig) -> ConfigState {
        let env = base
            .env
            .iter()
            .flatten()
            .map(|entry| match entry.split_once('=') {
                Some((key, value)) => (key.to_owned(), value.to_owned()),
                None => (entry.clone(), String::new()),
            })
            .collect();
        ConfigState {
            env,
            args: Vec::new(),
            workdir: base
                .working_dir
                .clone()
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| "/".to_owned()),
            user: base.user.clone().filter(|u| !u.is_empty()),
            entrypoint: base.entrypoint.clone(),
            cmd: base.cmd.clone(),
            exposed_ports: base
                .exposed_ports
                .iter()
                .flatten()
                .map(|(k, _)| k.clone())
                .collect(),
            labels: base.labels.clone().unwrap_or_default(),
            volumes: BTreeSet::new(),
            stop_signal: None,
        }
    }

    /// The value of an ENV variable.
    pub fn env_value(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// A variable as instruction arguments see it: ENV wins over ARG.
    pub(super) fn lookup(&self, name: &str) -> Option<String> {
        if let Some(value) = self.env_value(name) {
            return Some(value.to_owned());
        }
        self.args
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| value.clone())
    }

    pub(super) fn set_env(&mut self, key: String, value: String) {
        match self.env.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.env.push((key, value)),
        }
    }

    pub(super) fn set_arg(&mut self, key: String, value: Option<String>) {
        match self.args.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.args.push((key, value)),
        }
    }

    /// The environment a RUN step runs with: ARG values that are set and not shadowed by an
    /// ENV variable of the same name, then the ENV variables, each as `(name, value)`.
    pub fn run_env(&self) -> Vec<(String, String)> {
        let args = self.args.iter().filter_map(|(key, value)| {
            let value = value.as_ref()?;
            self.env_value(key)
                .is_none()
                .then(|| (key.clone(), value.clone()))
        });
        args.chain(self.env.iter().cloned()).collect()
    }

    /// The config to write into the built image (ARGs, volumes and the stop signal are left
    /// out: the run config type has no place for the last two).
    pub fn to_run_config(&self) -> RunConfig {
        let nonempty = |empty: bool| !empty;
        RunConfig {
            entrypoint: self.entrypoint.clone(),
            cmd: self.cmd.clone(),
            env: nonempty(self.env.is_empty()).then(|| {
                self.env
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect()
            }),
            // `/` is where a process starts anyway; leaving it unset keeps the runtime's own
            // default working directory for commands in sandboxes of the image.
            working_dir: (self.workdir != "/").then(|| self.workdir.clone()),
            user: self.user.clone(),
            exposed_ports: nonempty(self.exposed_ports.is_empty()).then(|| {
                self.exposed_ports
                    .iter()
                    .map(|port| (port.clone(), serde_json::Value::Object(Default::default())))
                    .collect()
            }),
            labels: nonempty(self.labels.is_empty()).then(|| self.labels.clone()),
        }
    }
}
