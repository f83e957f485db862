"""The block device agent: backends, the journal, device state, and the NBD front end."""
