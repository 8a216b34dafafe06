INSERT INTO __SCHEMA__.migrations (version, name, checksum) VALUES ($1, $2, $3)
