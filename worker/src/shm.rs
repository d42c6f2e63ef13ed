//! The router's view of the ownership table: the state region's table, with
//! liveness read from the stats region's slots.

use std::net::SocketAddr;

use udpshard_shared::owners::{Claim, Owner};
use udpshard_shared::state::StateRegion;
use udpshard_shared::stats::StatsRegion;

use crate::router::{Inherited, Owners};

pub(crate) struct ShmOwners {
    pub state: StateRegion,
    pub stats: StatsRegion,
}

impl Owners for ShmOwners {
    fn lookup(&self, hash: u64) -> Option<Owner> {
        self.state.owners().lookup(hash)
    }

    fn claim(&self, hash: u64, me: Owner) -> Claim {
        self.state
            .owners()
            .claim(hash, me, |o| self.stats.is_live(o))
    }

    fn assign(&self, hash: u64, to: Owner) {
        self.state.owners().assign(hash, to);
    }

    fn release(&self, hash: u64, me: Owner) {
        self.state.owners().release(hash, me);
    }

    fn live_owner(&self, worker: usize) -> Option<Owner> {
        self.stats.live_owner(worker)
    }

    fn slot_generation(&self, worker: usize) -> Option<u64> {
        self.stats.slot(worker).map(|s| s.life().0)
    }

    fn hint(&self, hash: u64, from: Owner) -> Option<Inherited> {
        let h = self.state.owners().hint(hash).filter(|h| h.owner == from)?;
        let ip = self.state.source_ip(usize::from(h.row))?;
        Some(Inherited {
            from,
            local: SocketAddr::new(ip, h.port),
            backend: h.backend,
        })
    }

    fn clear_hint(&self, hash: u64, me: Owner) {
        self.state.owners().forget_hint(hash, me);
    }

    fn set_hint(&self, hash: u64, me: Owner, local: SocketAddr, backend: u16) {
        if let Some(row) = self.state.source_row(local.ip()) {
            let _ = self
                .state
                .owners()
                .set_hint(hash, me, row as u8, local.port(), backend);
        }
    }
}
