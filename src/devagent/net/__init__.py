"""The network device agent: QEMU's stream netdev framing, uplinks, the frame forwarder."""
