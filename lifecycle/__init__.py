"""How every stage and tool of the toolkit starts, stops and fails: one preemption contract, one error path."""
