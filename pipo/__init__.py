"""pipo: pipelined offloading inference."""
