"""Who may call what, and how much: bearer tokens, mTLS identities and the access policy
(:mod:`access`), certificate reloading (:mod:`certs`), rate and concurrency limits
(:mod:`limits`)."""
