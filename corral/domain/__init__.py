"""Pure decisions: state machines and policies. No I/O; time is always passed in."""
