//! Async NBD client (fixed newstyle handshake, structured replies, block status).
//! Owned by the NBD client work; see the module's own docs once it lands.
