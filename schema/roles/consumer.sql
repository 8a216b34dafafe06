-- Least privilege for a consumer using the inbox.
GRANT USAGE ON SCHEMA __SCHEMA__ TO __ROLE__;
GRANT SELECT ON __SCHEMA__.settings, __SCHEMA__.migrations TO __ROLE__;
GRANT SELECT, INSERT, DELETE ON __SCHEMA__.inbox TO __ROLE__;
GRANT SELECT, INSERT ON __SCHEMA__.inbox_dead_letters TO __ROLE__;
