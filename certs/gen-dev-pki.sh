#!/usr/bin/env bash
# gen-dev-pki.sh OUTDIR [TRUST_DOMAIN]
# gen-dev-pki.sh --leaf OUTDIR CA_CRT CA_KEY STEM NS SA [TRUST_DOMAIN [NOT_BEFORE NOT_AFTER]]
#
# Generates the portcullis development / test PKI into OUTDIR (created if
# missing): a root CA, an unrelated root CA, good SPIFFE workload certs, an
# intermediate-CA chain, a 12-intermediate deep chain and a set of
# deliberately bad certificates.  See certs/README.md for the file list.
#
# Uses only the openssl CLI (tested with OpenSSL 3.0).  All certificates are
# issued with `openssl ca` and a throwaway minimal config, which lets us set
# arbitrary notBefore/notAfter (-startdate/-enddate) for the expired and
# not-yet-valid certs without faketime.  Every cert gets a random 159-bit
# serial (-rand_serial).  Keys are EC P-256, unencrypted PKCS#8 PEM, mode 0600.
#
# --leaf issues one more workload certificate (OUTDIR/STEM.crt + .key, SPIFFE
# ID spiffe://TRUST_DOMAIN/ns/NS/sa/SA) signed by an existing CA, the same way
# the full run issues its workload certs; NOT_BEFORE/NOT_AFTER are
# GeneralizedTime (YYYYMMDDHHMMSSZ), default now - 1 h .. + 30 days. Tests use
# it to mint rotations.
#
# Re-running into a populated OUTDIR regenerates everything.  Everything is
# built in a temp dir inside OUTDIR and then renamed into place.
set -euo pipefail

prog=gen-dev-pki
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }

mode=pki
if [[ ${1:-} == --leaf ]]; then
    mode=leaf
    shift
    [[ $# -eq 6 || $# -eq 7 || $# -eq 9 ]] ||
        die "usage: $0 --leaf OUTDIR CA_CRT CA_KEY STEM NS SA [TRUST_DOMAIN [NOT_BEFORE NOT_AFTER]]"
    outdir=$1 ca_crt=$2 ca_key=$3 stem=$4 ns=$5 sa=$6 td=${7:-cluster.local}
    start=${8:-} end=${9:-}
    for v in "$stem" "$ns" "$sa"; do
        [[ $v =~ ^[A-Za-z0-9._-]+$ && $v != . && $v != .. ]] || die "invalid name '$v'"
    done
    for v in "$start" "$end"; do
        [[ -z $v || $v =~ ^[0-9]{14}Z$ ]] || die "invalid time '$v' (want YYYYMMDDHHMMSSZ)"
    done
    [[ -r $ca_crt && -r $ca_key ]] || die "cannot read CA '$ca_crt' / '$ca_key'"
else
    [[ $# -ge 1 && $# -le 2 ]] || die "usage: $0 OUTDIR [TRUST_DOMAIN]   (default trust domain cluster.local)"
    outdir=$1
    td=${2:-cluster.local}
fi
[[ -n $outdir ]] || die "OUTDIR must not be empty"
# SPIFFE trust domain charset (also keeps the value safe to embed in configs).
[[ $td =~ ^[a-z0-9._-]+$ ]] || die "invalid trust domain '$td' (allowed: lowercase letters, digits, '.', '-', '_')"
command -v openssl >/dev/null 2>&1 || die "openssl not found in PATH"
command -v date >/dev/null 2>&1 || die "date not found in PATH"

mkdir -p -- "$outdir" || die "cannot create OUTDIR '$outdir'"
umask 077
tmp=$(mktemp -d "$outdir/.gen-dev-pki.XXXXXX") || die "cannot create temp dir in '$outdir'"
cleanup() { rm -rf -- "$tmp"; }
trap cleanup EXIT
log=$tmp/openssl.log

# run CMD...: run quietly; on failure show the command and its output.
run() {
    if ! "$@" >"$log" 2>&1; then
        printf '%s: error: command failed: %s\n' "$prog" "$*" >&2
        sed 's/^/    /' "$log" >&2
        exit 1
    fi
}

# --- times (GNU date, UTC, GeneralizedTime strings accepted by `openssl ca`) --
now=$(date -u +%s)
ts() { date -u -d "@$(( now + $1 ))" +%Y%m%d%H%M%SZ; }
day=86400
leaf_start=$(ts -3600)
leaf_end=$(ts $(( 30 * day - 3600 )))
# CA windows cover both the expired (2020) and not-yet-valid (+10y) leaves so
# that those are defective only in their own dates.
ca_start=20190101000000Z
ca_end=$(ts $(( 7305 * day )))             # ~ now + 20 years
nyv_start=$(ts $(( 3653 * day )))          # ~ now + 10 years
nyv_end=$(ts $(( (3653 + 365) * day )))    # ... for 1 year
exp_start=20200101000000Z
exp_end=20210101000000Z

# --- throwaway openssl config ------------------------------------------------
cnf=$tmp/openssl.cnf
mkdir "$tmp/newcerts"
: >"$tmp/index.txt"
cat >"$cnf" <<CNF
[ req ]
distinguished_name = req_dn
prompt             = no
[ req_dn ]
CN = unused
[ ca ]
default_ca = dev_ca
[ dev_ca ]
dir            = $tmp
database       = \$dir/index.txt
new_certs_dir  = \$dir/newcerts
serial         = \$dir/serial
unique_subject = no
default_md     = sha256
policy         = dev_policy
preserve       = yes
email_in_dn    = no
copy_extensions = none
[ dev_policy ]
organizationName       = optional
organizationalUnitName = optional
commonName             = supplied
CNF

# newreq STEM SUBJECT: new P-256 key (PKCS#8, unencrypted) + CSR in tmp.
newreq() {
    run openssl req -config "$cnf" -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -pkeyopt ec_param_enc:named_curve -noenc -sha256 \
        -keyout "$tmp/$1.key" -subj "$2" -out "$tmp/$1.csr"
}

# sign STEM ISSUER(stem|self) START END EXTFILE: issue $tmp/STEM.pem from its CSR.
sign() {
    local stem=$1 issuer=$2 start=$3 end=$4 ext=$5
    local -a who
    if [[ $issuer == self ]]; then
        who=(-selfsign -keyfile "$tmp/$stem.key")
    else
        who=(-cert "$tmp/$issuer.pem" -keyfile "$tmp/$issuer.key")
    fi
    run openssl ca -config "$cnf" -batch -notext -rand_serial -md sha256 \
        "${who[@]}" -startdate "$start" -enddate "$end" \
        -extfile "$ext" -extensions ext -in "$tmp/$stem.csr" -out "$tmp/$stem.pem"
}

ca_ext() {   # ca_ext FILE [pathlen]
    {
        echo "[ ext ]"
        if [[ -n ${2:-} ]]; then echo "basicConstraints = critical, CA:TRUE, pathlen:$2"
        else echo "basicConstraints = critical, CA:TRUE"; fi
        echo "keyUsage = critical, keyCertSign, cRLSign"
        echo "subjectKeyIdentifier = hash"
        echo "authorityKeyIdentifier = keyid"
    } >"$1"
}

# leaf_ext FILE SAN EKU [CA]
leaf_ext() {
    {
        echo "[ ext ]"
        if [[ ${4:-} == ca ]]; then
            echo "basicConstraints = critical, CA:TRUE"
            echo "keyUsage = critical, digitalSignature, keyCertSign"
        else
            echo "basicConstraints = critical, CA:FALSE"
            echo "keyUsage = critical, digitalSignature"
        fi
        echo "extendedKeyUsage = $3"
        echo "subjectAltName = $2"
        echo "subjectKeyIdentifier = hash"
        echo "authorityKeyIdentifier = keyid"
    } >"$1"
}

# --- workload leaves ----------------------------------------------------------------
both="serverAuth, clientAuth"
id() { echo "spiffe://$td/ns/$1/sa/$2"; }
fe_uri=$(id web frontend)
fe_dns=frontend.web.svc
fe_subj="/O=portcullis dev/CN=$fe_dns"

# leaf STEM ISSUER START END SAN EKU [ca] [SUBJECT]
leaf() {
    local stem=$1
    leaf_ext "$tmp/$stem.ext" "$5" "$6" "${7:-}"
    newreq "$stem" "${8:-$fe_subj}"
    sign "$stem" "$2" "$3" "$4" "$tmp/$stem.ext"
}

if [[ $mode == leaf ]]; then
    cp -- "$ca_crt" "$tmp/ca.pem"
    cp -- "$ca_key" "$tmp/ca.key"
    leaf "$stem" ca "${start:-$leaf_start}" "${end:-$leaf_end}" \
        "URI:$(id "$ns" "$sa"), DNS:$sa.$ns.svc" "$both" "" "/O=portcullis dev/CN=$sa.$ns.svc"
    final=("$stem")
else

# --- root CAs -----------------------------------------------------------------
ca_ext "$tmp/ca.ext"
newreq ca "/O=portcullis dev/CN=portcullis dev root CA"
sign ca self "$ca_start" "$ca_end" "$tmp/ca.ext"
newreq other-ca "/O=portcullis dev/CN=portcullis dev other root CA (untrusted)"
sign other-ca self "$ca_start" "$ca_end" "$tmp/ca.ext"

# --- intermediate CA + leaf -------------------------------------------------------
ca_ext "$tmp/int.ext" 0
newreq int-ca "/O=portcullis dev/CN=portcullis dev intermediate CA"
sign int-ca ca "$leaf_start" "$ca_end" "$tmp/int.ext"

final=(ca other-ca int-ca)
for w in payments-api web-frontend web-admin jobs-scheduler jobs-worker evil-intruder; do
    ns=${w%%-*} sa=${w#*-}
    leaf "$w" ca "$leaf_start" "$leaf_end" "URI:$(id "$ns" "$sa"), DNS:$sa.$ns.svc" "$both" "" \
        "/O=portcullis dev/CN=$sa.$ns.svc"
    final+=("$w")
done

fe_san="URI:$fe_uri, DNS:$fe_dns"
leaf web-viaint int-ca "$leaf_start" "$leaf_end" "$fe_san" "$both"
cat "$tmp/int-ca.pem" >>"$tmp/web-viaint.pem"
final+=(web-viaint)

# --- deep chain: ca -> deep-int-1 -> ... -> deep-int-12 -> leaf ---------------------
ca_ext "$tmp/deep.ext"
parent=ca
for i in $(seq 1 12); do
    newreq "deep-int-$i" "/O=portcullis dev/CN=portcullis dev deep intermediate $i"
    sign "deep-int-$i" "$parent" "$leaf_start" "$ca_end" "$tmp/deep.ext"
    parent=deep-int-$i
done
leaf deep-chain "$parent" "$leaf_start" "$leaf_end" "$fe_san" "$both"
for i in $(seq 12 -1 1); do cat "$tmp/deep-int-$i.pem" >>"$tmp/deep-chain.pem"; done
final+=(deep-chain)

# --- deliberately bad certs (each otherwise like web-frontend) ---------------------
leaf bad-other-ca      other-ca "$leaf_start" "$leaf_end" "$fe_san" "$both"
leaf bad-self-signed   self     "$leaf_start" "$leaf_end" "$fe_san" "$both"
leaf bad-expired       ca       "$exp_start"  "$exp_end"  "$fe_san" "$both"
leaf bad-not-yet-valid ca       "$nyv_start"  "$nyv_end"  "$fe_san" "$both"
leaf bad-two-uris      ca "$leaf_start" "$leaf_end" "URI:$fe_uri, URI:$(id jobs worker), DNS:$fe_dns" "$both"
leaf bad-no-uri        ca "$leaf_start" "$leaf_end" "DNS:$fe_dns" "$both"
leaf bad-wrong-td      ca "$leaf_start" "$leaf_end" "URI:spiffe://evil.example/ns/web/sa/frontend, DNS:$fe_dns" "$both"
leaf bad-server-only   ca "$leaf_start" "$leaf_end" "$fe_san" "serverAuth"
leaf bad-client-only   ca "$leaf_start" "$leaf_end" "$fe_san" "clientAuth"
leaf bad-ca-leaf       ca "$leaf_start" "$leaf_end" "$fe_san" "$both" ca
leaf bad-malformed-id  ca "$leaf_start" "$leaf_end" "URI:spiffe://$td/ns/web/sa/../frontend, DNS:$fe_dns" "$both"
leaf bad-not-spiffe    ca "$leaf_start" "$leaf_end" "URI:https://$td/ns/web/sa/frontend, DNS:$fe_dns" "$both"
final+=(bad-other-ca bad-self-signed bad-expired bad-not-yet-valid bad-two-uris bad-no-uri
        bad-wrong-td bad-server-only bad-client-only bad-ca-leaf bad-malformed-id bad-not-spiffe)
fi

# --- install ------------------------------------------------------------------------
for f in "${final[@]}"; do
    grep -q -- '-----BEGIN PRIVATE KEY-----' "$tmp/$f.key" || die "$f.key is not an unencrypted PKCS#8 PEM key"
    chmod 0600 "$tmp/$f.key"
    chmod 0644 "$tmp/$f.pem"
done
for f in "${final[@]}"; do
    mv -f -- "$tmp/$f.key" "$outdir/$f.key"
    mv -f -- "$tmp/$f.pem" "$outdir/$f.crt"
done

printf '%s: wrote %d certs + keys to %s (trust domain %s)\n' "$prog" "${#final[@]}" "$outdir" "$td"
