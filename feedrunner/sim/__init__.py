"""Local venues speaking the real wire protocols, so the real client libraries judge their fidelity."""
