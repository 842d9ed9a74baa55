#!/usr/bin/env bash
# The seed's integration check, against any deployment of HMS-API + HMS-OMS + hms-sync:
#
#   1. create an order in HMS-API                4. wait until HMS-API shows processing
#   2. wait until it is synced to HMS-OMS        5. mark the OMS order done
#   3. set the OMS order's state to in_progress  6. wait until HMS-API shows completed
#
# It creates a real order (title "hms-sync integration check ...") and drives it to
# completed: run it against a test deployment. hms-sync must be running against the same
# two systems.
#
# Environment (contract section 5):
#   HMS_API_URL           default http://api-service:8000
#   HMS_API_TOKEN         required
#   OMS_API_URL           default http://oms-service:3000
#   OMS_API_KEY           required
#   OMS_ORDER_TYPE_CODE   default api_order
#   TIMEOUT               seconds each wait may take, default 30
#   TEST_USER_ID          user_id of the test order, default 1
#
# Needs bash, curl and python3 (for JSON). Credentials are never printed, and never put on
# a command line (they reach curl through a private temporary file).
# Exit: 0 all six steps passed, 1 a step failed, 2 bad environment.

set -euo pipefail

die() {
    echo "error: $*" >&2
    exit 2
}

for tool in curl python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is required but not installed"
done

HMS_API_URL="${HMS_API_URL:-http://api-service:8000}"
OMS_API_URL="${OMS_API_URL:-http://oms-service:3000}"
OMS_ORDER_TYPE_CODE="${OMS_ORDER_TYPE_CODE:-api_order}"
TIMEOUT="${TIMEOUT:-30}"
TEST_USER_ID="${TEST_USER_ID:-1}"

[[ -n "${HMS_API_TOKEN:-}" ]] || die "HMS_API_TOKEN is not set (the HMS-API bearer token)"
[[ -n "${OMS_API_KEY:-}" ]] || die "OMS_API_KEY is not set (the HMS-OMS API key)"
[[ "$HMS_API_URL" =~ ^https?://[^[:space:]]+$ ]] || die "HMS_API_URL is not an http(s) URL"
[[ "$OMS_API_URL" =~ ^https?://[^[:space:]]+$ ]] || die "OMS_API_URL is not an http(s) URL"
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "TIMEOUT must be a positive integer"
[[ "$TEST_USER_ID" =~ ^[0-9]+$ ]] || die "TEST_USER_ID must be an integer"
[[ "$OMS_ORDER_TYPE_CODE" =~ ^[A-Za-z0-9_.-]+$ ]] || die "OMS_ORDER_TYPE_CODE looks wrong"
HMS_API_URL="${HMS_API_URL%/}"
OMS_API_URL="${OMS_API_URL%/}"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
chmod 700 "$WORK"
# curl reads the Authorization headers from files, so no credential is in argv or output.
(
    umask 077
    printf 'Authorization: Bearer %s\n' "$HMS_API_TOKEN" >"$WORK/api.headers"
    printf 'Authorization: Token token="%s"\n' "$OMS_API_KEY" >"$WORK/oms.headers"
)

now_us() {
    if [[ -n "${EPOCHREALTIME:-}" ]]; then
        echo "${EPOCHREALTIME/[.,]/}"
    else
        echo "$(($(date +%s%N) / 1000))"
    fi
}

# request SYSTEM METHOD PATH [BODY]: sets STATUS; the answer body is in $WORK/body.
request() {
    local system="$1" method="$2" path="$3" body="${4:-}" base
    if [[ "$system" == api ]]; then base="$HMS_API_URL"; else base="$OMS_API_URL"; fi
    local args=(-sS -o "$WORK/body" -w '%{http_code}' -X "$method" --max-time 15
        -H "@$WORK/$system.headers" -H 'Accept: application/json')
    if [[ -n "$body" ]]; then
        printf '%s' "$body" >"$WORK/request"
        args+=(-H 'Content-Type: application/json' --data-binary "@$WORK/request")
    fi
    : >"$WORK/body"
    STATUS="$(curl "${args[@]}" "$base$path" 2>"$WORK/curl.err")" || STATUS=000
}

# field PATH: a value of the JSON answer, e.g. field data.status ("" when null or absent).
field() {
    python3 - "$1" "$WORK/body" <<'PY'
import json, sys
path, file = sys.argv[1], sys.argv[2]
try:
    value = json.load(open(file, encoding="utf-8"))
    for key in path.split("."):
        value = value[int(key)] if isinstance(value, list) else value.get(key)
except (ValueError, AttributeError, IndexError, TypeError, OSError):
    value = None
print("" if value is None else value)
PY
}

# what went wrong with the last request, without ever echoing a credential
answer() {
    if [[ "$STATUS" == 000 ]]; then
        echo "no answer ($(tr -d '\n' <"$WORK/curl.err" | cut -c1-200))"
    else
        echo "HTTP $STATUS: $(head -c 300 "$WORK/body" | tr -d '\n')"
    fi
}

STEP=0
STEP_START=0
begin() {
    STEP=$((STEP + 1))
    STEP_START="$(now_us)"
    printf '[%d/6] %s ... ' "$STEP" "$1"
}
elapsed() {
    local ms=$((($(now_us) - STEP_START) / 1000))
    printf '%d.%03ds' $((ms / 1000)) $((ms % 1000))
}
pass() {
    echo "PASS ($(elapsed))${1:+ $1}"
}
fail() {
    echo "FAIL ($(elapsed)) $1"
    echo "integration check FAILED at step $STEP of 6" >&2
    exit 1
}

# wait_for DESCRIPTION COMMAND...: retry COMMAND (which returns 0 when done) until TIMEOUT.
wait_for() {
    local deadline=$(($(now_us) + TIMEOUT * 1000000))
    while ! "${@:2}"; do
        if (($(now_us) > deadline)); then
            fail "$1 not seen within ${TIMEOUT}s; last answer: $(answer)"
        fi
        sleep 0.2
    done
}

echo "HMS-API $HMS_API_URL, HMS-OMS $OMS_API_URL, order type $OMS_ORDER_TYPE_CODE"

# 1. Create an order in HMS-API
begin "Create an order in HMS-API"
title="hms-sync integration check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
body="$(python3 -c 'import json, sys; print(json.dumps({"title": sys.argv[1],
    "user_id": int(sys.argv[2]), "items": [{"sku": "HMS-SYNC-CHECK", "name": "Integration check",
    "quantity": 1, "unit_price": "0.00"}]}))' "$title" "$TEST_USER_ID")"
request api POST /api/orders "$body"
[[ "$STATUS" == 201 || "$STATUS" == 200 ]] || fail "$(answer)"
ORDER_ID="$(field data.id)"
[[ "$ORDER_ID" =~ ^[0-9]+$ ]] || fail "no order id in the answer: $(answer)"
[[ "$(field data.status)" == pending ]] || fail "new order is not pending: $(answer)"
pass "API order $ORDER_ID"

# 2. Verify the order was synced to HMS-OMS
begin "Verify the order was synced to HMS-OMS"
OMS_CODE=""
synced() {
    request api GET "/api/orders/$ORDER_ID"
    [[ "$STATUS" == 200 ]] || return 1
    local code
    code="$(field data.oms_order_code)"
    [[ -n "$code" ]] || return 1
    request oms GET "/api/v1/orders/$(python3 -c 'import sys, urllib.parse as u;
print(u.quote(sys.argv[1], safe=""))' "$code")"
    [[ "$STATUS" == 200 ]] || return 1
    [[ "$(field order.ext_code)" == "$ORDER_ID" ]] || return 1
    [[ "$(field order.order_type_code)" == "$OMS_ORDER_TYPE_CODE" ]] || return 1
    OMS_CODE="$code"
}
wait_for "API order with oms_order_code naming an OMS order with ext_code $ORDER_ID" synced
OMS_PATH="$(python3 -c 'import sys, urllib.parse as u; print(u.quote(sys.argv[1], safe=""))' \
    "$OMS_CODE")"
pass "OMS order $OMS_CODE (state $(field order.state))"

# 3. Update the order status in HMS-OMS
begin "Update the order state in HMS-OMS to in_progress"
request oms PATCH "/api/v1/orders/$OMS_PATH" '{"order": {"state": "in_progress"}}'
[[ "$STATUS" == 200 && "$(field order.state)" == in_progress ]] || fail "$(answer)"
pass

# 4. Verify the status update in HMS-API
api_status_is() {
    request api GET "/api/orders/$ORDER_ID"
    [[ "$STATUS" == 200 && "$(field data.status)" == "$1" ]]
}
begin "Verify HMS-API shows processing"
wait_for "API status processing" api_status_is processing
pass

# 5. Mark the order as complete in HMS-OMS
begin "Mark the order done in HMS-OMS"
request oms PATCH "/api/v1/orders/$OMS_PATH" '{"order": {"state": "done"}}'
[[ "$STATUS" == 200 && "$(field order.state)" == done ]] || fail "$(answer)"
pass

# 6. Verify order completion in HMS-API
begin "Verify HMS-API shows completed"
wait_for "API status completed" api_status_is completed
pass

echo "integration check passed: API order $ORDER_ID <-> OMS order $OMS_CODE"
