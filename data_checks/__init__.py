"""Great Expectations suites, written as code, and the gate that runs them."""
