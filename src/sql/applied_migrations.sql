SELECT version, checksum FROM __SCHEMA__.migrations ORDER BY version
