#!/bin/sh
# Creates the identity (Ed25519 private key, PKCS#8 PEM, as `apiary keygen` writes it) of each
# service of this participant's bundle where absent, and prints each service's peer id:
#
#   sh deploy/identities.sh [folder]       (default ./secrets; run from the repository root)
#
# compose.yaml hands <folder>/<service>.key to its service as the Compose secret
# /run/secrets/identity (APIARY_<SERVICE>_IDENTITY_FILE in .env names another file). An existing
# key is kept, so the peer ids stay those of earlier runs. The folder is made private (0700); the
# keys in it are readable by all (0644) so that the containers' unprivileged user reads its
# bind-mounted copy. Needs openssl and coreutils' base32.
set -eu
folder="${1:-./secrets}"
mkdir -p "$folder"
chmod 700 "$folder"
for service in dht averager expert-server trainer; do
    key="$folder/$service.key"
    if [ ! -s "$key" ]; then
        openssl genpkey -algorithm ed25519 -out "$key.partial"
        mv "$key.partial" "$key"
    fi
    chmod 644 "$key"
    # the peer id: the raw 32-byte public key (the end of its DER form) in lowercase base32, unpadded
    peer_id="$(openssl pkey -in "$key" -pubout -outform DER | tail -c 32 | base32 -w 0 | tr -d '=' | tr 'A-Z' 'a-z')"
    echo "$service $peer_id"
done
