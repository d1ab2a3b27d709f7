"""Settings: one TOML file plus HSMSCEP_* environment variables, read and checked once.

settings (the Settings tree, load_settings), sections (one dataclass per section; [log] in
logsection), reader (the one typed reader), profiles, template, subject_pattern and webhook
(profile tables), rollover (the rollover state file, read and written). Never loads a
PKCS#11 module or an HTTP client. May import protocol, policy, hsm.refs and errors.
"""
