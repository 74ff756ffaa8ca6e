"""Where a render's ranks live: the executor interface and its outcome (`base`, which `cluster/` implements), the
in-process executor and the pool that hands a render its executor (`pool`)."""
