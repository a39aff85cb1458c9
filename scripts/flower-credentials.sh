#!/usr/bin/env bash
# Credentials for a Flower deployment of fedit: a private CA, the SuperLink's TLS
# certificate signed by it, and one ECDSA key pair per SuperNode (node authentication).
#   scripts/flower-credentials.sh OUT_DIR [NODES] [EXTRA_SANS]
#   scripts/flower-credentials.sh creds 2 "DNS:fl.example.org,IP:10.0.0.5"
#   scripts/flower-credentials.sh /etc/fedit/creds 0 "DNS:fl.example.org"   # no node keys
# NODES (default 2) may be 0: in a real deployment each party makes its own key pair.
# OUT_DIR/ca.crt          give to every SuperNode and `flwr` user (--root-certificates)
# OUT_DIR/ca.key          keep offline: it signs the next server certificate (rotation)
# OUT_DIR/server.pem/.key the SuperLink's certificate and key (--ssl-certfile/--ssl-keyfile)
# OUT_DIR/node-K, .pub    SuperNode K's private key (stays on its machine) and public key
#                         (registered with `flwr supernode register node-K.pub CONNECTION`)
# The server certificate names 127.0.0.1 and localhost plus EXTRA_SANS (the address the
# SuperNodes dial). Nothing is overwritten: a new OUT_DIR is a new set of credentials,
# and an existing ca.key in OUT_DIR is reused to sign a fresh server certificate.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [NODES] [EXTRA_SANS]}
nodes=${2:-2}
extra=${3:-}
[[ $nodes =~ ^[0-9]+$ ]] || { echo "$0: NODES must be a number >= 0, got '$nodes'" >&2; exit 2; }
days=${FEDIT_CERT_DAYS:-365}
mkdir -p "$out"
cd "$out"
umask 077

if [[ ! -f ca.key ]]; then
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=fedit private CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.crt 2>/dev/null
fi

sans="IP:127.0.0.1,DNS:localhost${extra:+,$extra}"
stamp=$(date +%Y%m%d%H%M%S)-$$
openssl ecparam -name prime256v1 -genkey -noout -out "server-$stamp.key"
openssl req -new -key "server-$stamp.key" -subj "/CN=fedit SuperLink" -out server.csr 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$sans" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
  -sha256 -extfile server.ext -out "server-$stamp.pem" 2>/dev/null
rm -f server.csr server.ext
ln -sf "server-$stamp.pem" server.pem
ln -sf "server-$stamp.key" server.key

pubs=()
for ((k = 0; k < nodes; k++)); do
  [[ -f node-$k ]] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedit node $k" -f "node-$k"
  pubs+=("node-$k.pub")
done
# public files readable by all; with NODES = 0 there is no node key (a valid request:
# each party makes its own key pair on its own machine)
chmod 644 ca.crt "server-$stamp.pem" ${pubs[@]+"${pubs[@]}"}
keys=", no node keys"
if ((nodes > 0)); then keys=", node-0..$((nodes - 1)) (+ .pub)"; fi
echo "credentials in $out: ca.crt, server.pem (SAN $sans), server.key$keys"
