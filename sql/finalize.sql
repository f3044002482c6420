-- pgseal privileges. Included last (extension_sql_file!(…, finalize)).
-- Every function starts closed; each role gets exactly what docs/SECURITY.md lists.

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgseal FROM PUBLIC;

-- Policies call current_tenant() as the querying user; vault_status() shows no secret.
GRANT EXECUTE ON FUNCTION pgseal.current_tenant() TO PUBLIC;
GRANT EXECUTE ON FUNCTION pgseal.vault_status() TO PUBLIC;

GRANT EXECUTE ON FUNCTION
    pgseal.vault_seal(text, text),
    pgseal.vault_redact(text, integer, text)
TO pgseal_seal;

GRANT EXECUTE ON FUNCTION
    pgseal.vault_decrypt(text, text),
    pgseal.vault_rewrap(text, text)
TO pgseal_decrypt;

GRANT EXECUTE ON FUNCTION
    pgseal.tenant_key_rotate(text),
    pgseal.kek_rewrap(integer),
    pgseal.tenant_shred(text),
    pgseal.key_cache_entries()
TO pgseal_admin;
