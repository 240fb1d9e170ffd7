//! Network leases: sandbox addresses and forwarded host ports, each a row
//! keyed by the address or port, so two processes can never hand out the
//! same one (allocation is a read and an insert in one write transaction).
//! A sandbox's leases go with its record ([`release_all`] runs in
//! [`Store::delete`]'s transaction).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use rusqlite::{params, Transaction};

use super::{query_err, to_json, Store, StoreError};
use crate::network::{ForwardRequest, Ipv4Net, PortForward, PortRange, SandboxNet};

impl Store {
    /// Leases the lowest free address of `subnet` from host number `first`
    /// on to sandbox `id`, builds its network with `make` and records it on
    /// the sandbox `name`. `AddressesExhausted` when none is free.
    pub fn attach_network(
        &self,
        name: &str,
        id: &str,
        subnet: Ipv4Net,
        first: u32,
        make: impl FnOnce(Ipv4Addr) -> SandboxNet,
    ) -> Result<SandboxNet, StoreError> {
        let op = "lease an address";
        self.write(op, |tx| {
            let used: BTreeSet<u32> = column_values(tx, "SELECT address FROM addresses", op)?
                .into_iter()
                .map(|a| a as u32)
                .collect();
            let address = (first..=subnet.host_count())
                .filter_map(|n| subnet.host(n))
                .find(|a| !used.contains(&u32::from(*a)))
                .ok_or(StoreError::AddressesExhausted { subnet })?;
            tx.execute(
                "INSERT INTO addresses (address, sandbox_id) VALUES (?1, ?2)",
                params![i64::from(u32::from(address)), id],
            )
            .map_err(query_err(op))?;
            let net = make(address);
            set_network(tx, name, id, &net)?;
            Ok(net)
        })
    }

    /// Replaces the recorded network of sandbox `name` (its address stays
    /// leased).
    pub fn update_network(&self, name: &str, id: &str, net: &SandboxNet) -> Result<(), StoreError> {
        self.write("record a sandbox's network", |tx| {
            set_network(tx, name, id, net)
        })
    }

    /// Leases host ports for `requests` to sandbox `id`, all or none: a
    /// given port must be free here (`PortTaken`) and accepted by
    /// `available` (free on the host); an absent one is the first port of
    /// `range` from `start` on (wrapping around) that is both
    /// (`PortsExhausted`). At most `max` forwards in all
    /// (`TooManyForwards`).
    pub fn add_forwards(
        &self,
        id: &str,
        requests: &[ForwardRequest],
        range: PortRange,
        start: u16,
        max: usize,
        available: impl Fn(u16) -> bool,
    ) -> Result<Vec<PortForward>, StoreError> {
        let op = "lease host ports";
        self.write(op, |tx| {
            let mut used: BTreeSet<u16> = column_values(tx, "SELECT host_port FROM forwards", op)?
                .into_iter()
                .map(|p| p as u16)
                .collect();
            let existing = forwards_of(tx, id)?.len();
            if existing + requests.len() > max {
                return Err(StoreError::TooManyForwards {
                    max,
                    existing,
                    adding: requests.len(),
                });
            }
            // Chosen ports first, so the search for free ones skips them.
            for port in requests.iter().filter_map(|r| r.host_port) {
                if used.contains(&port) || !available(port) {
                    return Err(StoreError::PortTaken { port });
                }
                used.insert(port);
            }
            let wanted = requests.iter().filter(|r| r.host_port.is_none()).count();
            let start = start.clamp(range.first, range.last);
            let mut picked: Vec<u16> = (start..=range.last)
                .chain(range.first..start)
                .filter(|p| !used.contains(p) && available(*p))
                .take(wanted)
                .collect();
            if picked.len() < wanted {
                return Err(StoreError::PortsExhausted { range });
            }
            // Ascending, so picked ports follow the requests' order (forwards are listed by
            // host port) even when the search wrapped around the end of the range.
            picked.sort_unstable();
            let mut picked = picked.into_iter();
            let mut added = Vec::with_capacity(requests.len());
            for request in requests {
                let host_port = match request.host_port {
                    Some(port) => port,
                    None => picked
                        .next()
                        .expect("one picked port per request without one"),
                };
                tx.execute(
                    "INSERT INTO forwards (host_port, sandbox_id, guest_port, description)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![host_port, id, request.guest_port, request.description],
                )
                .map_err(query_err(op))?;
                added.push(PortForward {
                    host_port,
                    guest_port: request.guest_port,
                    description: request.description.clone(),
                });
            }
            Ok(added)
        })
    }

    /// Drops the forwards of sandbox `id` on `host_ports` (all of them when
    /// `None`); returns those removed.
    pub fn remove_forwards(
        &self,
        id: &str,
        host_ports: Option<&[u16]>,
    ) -> Result<Vec<PortForward>, StoreError> {
        self.write("remove forwards", |tx| {
            let current = forwards_of(tx, id)?;
            let removed: Vec<PortForward> = current
                .into_iter()
                .filter(|f| host_ports.is_none_or(|ports| ports.contains(&f.host_port)))
                .collect();
            for forward in &removed {
                tx.execute(
                    "DELETE FROM forwards WHERE host_port = ?1 AND sandbox_id = ?2",
                    params![forward.host_port, id],
                )
                .map_err(query_err("remove forwards"))?;
            }
            Ok(removed)
        })
    }

    /// The forwards of sandbox `id`, by host port.
    pub fn forwards(&self, id: &str) -> Result<Vec<PortForward>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(query_err("read forwards"))?;
        forwards_of(&tx, id)
    }

    /// Every forward, by sandbox id.
    pub fn all_forwards(&self) -> Result<BTreeMap<String, Vec<PortForward>>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT sandbox_id, host_port, guest_port, description FROM forwards
                 ORDER BY host_port",
            )
            .map_err(query_err("read forwards"))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    PortForward {
                        host_port: row.get(1)?,
                        guest_port: row.get(2)?,
                        description: row.get(3)?,
                    },
                ))
            })
            .map_err(query_err("read forwards"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(query_err("read forwards"))?;
        let mut map: BTreeMap<String, Vec<PortForward>> = BTreeMap::new();
        for (id, forward) in rows {
            map.entry(id).or_default().push(forward);
        }
        Ok(map)
    }
}

fn set_network(
    tx: &Transaction<'_>,
    name: &str,
    id: &str,
    net: &SandboxNet,
) -> Result<(), StoreError> {
    let changed = tx
        .execute(
            "UPDATE sandboxes SET network = ?1 WHERE name = ?2 AND id = ?3",
            params![to_json(net), name, id],
        )
        .map_err(query_err("record a sandbox's network"))?;
    if changed == 0 {
        return Err(StoreError::Missing {
            name: name.to_string(),
        });
    }
    Ok(())
}

fn forwards_of(tx: &Transaction<'_>, id: &str) -> Result<Vec<PortForward>, StoreError> {
    let mut stmt = tx
        .prepare_cached(
            "SELECT host_port, guest_port, description FROM forwards WHERE sandbox_id = ?1
             ORDER BY host_port",
        )
        .map_err(query_err("read forwards"))?;
    let rows = stmt
        .query_map([id], |row| {
            Ok(PortForward {
                host_port: row.get(0)?,
                guest_port: row.get(1)?,
                description: row.get(2)?,
            })
        })
        .map_err(query_err("read forwards"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(query_err("read forwards"));
    rows
}

fn column_values(
    tx: &Transaction<'_>,
    sql: &str,
    op: &'static str,
) -> Result<Vec<i64>, StoreError> {
    let mut stmt = tx.prepare_cached(sql).map_err(query_err(op))?;
    let values = stmt
        .query_map([], |row| row.get(0))
        .map_err(query_err(op))?
        .collect::<Result<Vec<i64>, _>>()
        .map_err(query_err(op));
    values
}

/// Drops every lease of sandbox `id` (its record is being deleted).
pub(super) fn release_all(tx: &Transaction<'_>, id: &str) -> Result<(), StoreError> {
    for sql in [
        "DELETE FROM addresses WHERE sandbox_id = ?1",
        "DELETE FROM forwards WHERE sandbox_id = ?1",
    ] {
        tx.execute(sql, [id])
            .map_err(query_err("release a sandbox's leases"))?;
    }
    Ok(())
}
