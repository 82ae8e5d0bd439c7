"""imafs: an emulator of the Linux IMA securityfs tree, and a keeper of its log."""
