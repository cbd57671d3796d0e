# Sourced by bench/nbd-tls.sh and bench/tunnel.sh: a CA, the server's certificate (qemu's
# tls-creds-x509 directory DIR/server) and the client's (libnbd's layout DIR/client, read by
# `sendense-node copy --to-tls`), ECDSA P-256 as the hub's CA issues them; and the qemu-nbd
# options of a TLS export with the hub's authz (the job's CN and the hub's).
# Needs: DIR, openssl.
nbd_tls_certs() {
    mkdir -m 700 "$DIR/server" "$DIR/client"
    ossl() { openssl "$@" 2>/dev/null; }
    ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        -keyout "$DIR/ca-key.pem" -out "$DIR/ca-cert.pem"
    leaf() { # cn ext out-cert out-key
        ossl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" -keyout "$4" -out "$DIR/req.csr"
        printf '%s\n' "$2" "keyUsage=critical,digitalSignature,keyEncipherment" >"$DIR/ext.cnf"
        ossl x509 -req -in "$DIR/req.csr" -CA "$DIR/ca-cert.pem" -CAkey "$DIR/ca-key.pem" -CAcreateserial \
            -days 2 -extfile "$DIR/ext.cnf" -out "$3"
    }
    leaf sendense-nbd "extendedKeyUsage=serverAuth
subjectAltName=DNS:sendense-nbd" "$DIR/server/server-cert.pem" "$DIR/server/server-key.pem"
    leaf sendense-job-bench "extendedKeyUsage=clientAuth" "$DIR/client/client-cert.pem" "$DIR/client/client-key.pem"
    cp "$DIR/ca-cert.pem" "$DIR/server/"; cp "$DIR/ca-cert.pem" "$DIR/client/"
}
# Sets NBD_TLS_ARGS (qemu-nbd) and COPY_TLS_ARGS (copy) for mode plain|tls.
nbd_tls_args() {
    NBD_TLS_ARGS=(); COPY_TLS_ARGS=()
    if [[ $1 == tls ]]; then
        NBD_TLS_ARGS=(--object "{\"qom-type\":\"tls-creds-x509\",\"id\":\"tls0\",\"dir\":\"$DIR/server\",\"endpoint\":\"server\",\"verify-peer\":true}"
             --object '{"qom-type":"authz-list","id":"auth0","policy":"deny","rules":[{"match":"CN=sendense-hub","policy":"allow"},{"match":"CN=sendense-job-bench","policy":"allow"}]}'
             --tls-creds=tls0 --tls-authz=auth0)
        COPY_TLS_ARGS=(--to-tls "$DIR/client")
    fi
}
