//! The wire dialect a remote serves its devices with: the one place in
//! `remote-host` that chooses between vfio-user and mpqemu. The config
//! path (`serve`), the control channel's `device-add` and whatever comes
//! later on the serving side go through it.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use config::Protocol;

use crate::devices::RemoteDevice;
use crate::sockets::Endpoint;

/// A protocol with its server options.
#[derive(Clone)]
pub enum Dialect {
    VfioUser(channel::vfio_user::ServerOptions),
    Mpqemu(channel::mpqemu::ServerOptions),
}

impl Dialect {
    /// `protocol` with a busy-poll window of `poll` (zero: sleep at once;
    /// otherwise the window adapts to the traffic).
    pub fn new(protocol: Protocol, poll: Duration) -> Self {
        let adaptive_poll = !poll.is_zero();
        match protocol {
            Protocol::VfioUser => Dialect::VfioUser(channel::vfio_user::ServerOptions {
                poll,
                adaptive_poll,
                ..Default::default()
            }),
            Protocol::Mpqemu => Dialect::Mpqemu(channel::mpqemu::ServerOptions {
                poll,
                adaptive_poll,
                ..Default::default()
            }),
        }
    }

    /// The busy-poll window (also the access ring's).
    pub fn poll(&self) -> Duration {
        match self {
            Dialect::VfioUser(o) => o.poll,
            Dialect::Mpqemu(o) => o.poll,
        }
    }

    /// Serves `devices` at `endpoint` until every listener ends, or, for a
    /// connected fd, until its client goes away.
    pub fn serve(&self, devices: Vec<Arc<RemoteDevice>>, endpoint: Endpoint) -> anyhow::Result<()> {
        match self {
            Dialect::VfioUser(o) => crate::serve_vfio_user::serve(devices, endpoint, o),
            Dialect::Mpqemu(o) => crate::serve_mpqemu::serve(devices, endpoint, o),
        }
    }

    /// Serves one connected client of `dev` until it goes away.
    pub fn serve_stream(&self, dev: Arc<RemoteDevice>, sock: UnixStream) {
        match self {
            Dialect::VfioUser(o) => crate::serve_vfio_user::serve_stream(dev, sock, o),
            Dialect::Mpqemu(o) => crate::serve_mpqemu::serve_stream(dev, sock, o),
        }
    }
}
