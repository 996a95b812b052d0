#!/usr/bin/env bash
# Deploy SENSE Gateway, as the original system was: ./deploy.sh --mode server|lambda|all
# Run ./deploy.sh --help for the options; docs/deploy.md explains each mode.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  cat <<'EOF'
Usage: ./deploy.sh --mode server|lambda|all [options]

Modes:
  server   the CoAP gateway: builds the container image and runs it with UDP 5683
           published (host network, IPv6 and IPv4); where no Docker engine answers,
           installs a venv and the systemd unit from etc/systemd/ instead
  lambda   builds the Lambda package, uploads it to an artifact bucket (made if missing)
           and creates or updates the CloudFormation stack of etc/aws/sense-gateway.yaml
           through a change set: queue, dead-letter queue, device and credential tables,
           roles and policies, function, event-source mapping, alarm, liveness schedule
           (a second run reports the stack unchanged)
  all      lambda, then server as role gateway configured from the stack's outputs
           (its queue and device tables), then InfluxDB and Grafana from compose.yaml

Options:
  --mode MODE            server, lambda or all (required)
  --dry-run              print each step, change nothing (lambda: the change set is
                         made, printed and deleted)
  --endpoint-url URL     an AWS-compatible endpoint for every AWS call (e.g. moto)
  --region REGION        AWS region (default: $AWS_REGION, $AWS_DEFAULT_REGION or us-east-1)
  --profile PROFILE      AWS credentials profile
  --name NAME            the stack, and the prefix of the AWS resource names (default: sense)
  --package FILE         where to build the Lambda zip (default: dist/sense-gateway-lambda.zip)
  --architecture ARCH    the function's: x86_64 (default) or arm64
  --bucket BUCKET        artifact bucket for the zip (default: NAME-artifacts-ACCOUNT-REGION)
  --parameter KEY=VALUE  a parameter of the template (repeatable), e.g. MaxReceiveCount=10;
                         one not given keeps the stack's value (new stack: the default)
  --env NAME=VALUE       a SENSE_INFLUXDB_* variable of the function, as its parameter
                         (repeatable); SENSE_INFLUXDB_* variables of this shell are taken too
  --role ROLE            the server's role: all, gateway or processor
                         (default: all for --mode server, gateway for --mode all)
  --plain-ingest POLICY  what plain CoAP (5683) may write: off (default), uncredentialed
                         or open (docs/security.md)
  --docker | --no-docker server: use Docker, or the venv and systemd, whatever is found
  --image NAME           container image (default: sense-gateway:latest)
  --prefix DIR           server without Docker: the venv (default: /opt/sense-gateway)
  --root DIR             server without Docker: install under DIR instead of /, and
                         leave users and systemctl alone (for staging and packaging)
  -h, --help             this text
  -- ARGS...             lambda: more options for python -m sense_gateway.aws.deploy

Examples:
  ./deploy.sh --mode lambda --region eu-central-1 --env SENSE_INFLUXDB_URL=https://influx.example.org:8086
  ./deploy.sh --mode lambda --parameter FunctionTimeout=120 --parameter AlarmTopicArn=arn:aws:sns:...
  ./deploy.sh --mode server --dry-run
  ./deploy.sh --mode lambda --endpoint-url http://127.0.0.1:5000    # against moto_server
EOF
}

die() {
  echo "deploy.sh: $*" >&2
  exit 2
}

MODE=""
DRY_RUN=0
ENDPOINT_URL=""
REGION="${AWS_REGION:-${AWS_DEFAULT_REGION:-us-east-1}}"
PROFILE=""
NAME="sense"
PLAIN_INGEST="off"
ROLE=""
USE_DOCKER="auto"
IMAGE="sense-gateway:latest"
PREFIX="/opt/sense-gateway"
ROOT="/"
CONTAINER="sense-gateway"
PACKAGE="$REPO/dist/sense-gateway-lambda.zip"
ARCHITECTURE="x86_64"
LAMBDA_ARGS=()

while [ $# -gt 0 ]; do
  case "$1" in
    --mode) [ $# -ge 2 ] || die "--mode needs a value"; MODE="$2"; shift 2 ;;
    --mode=*) MODE="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --endpoint-url) [ $# -ge 2 ] || die "--endpoint-url needs a value"; ENDPOINT_URL="$2"; shift 2 ;;
    --region) [ $# -ge 2 ] || die "--region needs a value"; REGION="$2"; shift 2 ;;
    --profile) [ $# -ge 2 ] || die "--profile needs a value"; PROFILE="$2"; shift 2 ;;
    --name) [ $# -ge 2 ] || die "--name needs a value"; NAME="$2"; shift 2 ;;
    --package) [ $# -ge 2 ] || die "--package needs a value"; PACKAGE="$2"; shift 2 ;;
    --env) [ $# -ge 2 ] || die "--env needs NAME=VALUE"; LAMBDA_ARGS+=(--env "$2"); shift 2 ;;
    --parameter) [ $# -ge 2 ] || die "--parameter needs KEY=VALUE"; LAMBDA_ARGS+=(--parameter "$2"); shift 2 ;;
    --bucket) [ $# -ge 2 ] || die "--bucket needs a value"; LAMBDA_ARGS+=(--bucket "$2"); shift 2 ;;
    --architecture) [ $# -ge 2 ] || die "--architecture needs a value"; ARCHITECTURE="$2"; shift 2 ;;
    --role) [ $# -ge 2 ] || die "--role needs a value"; ROLE="$2"; shift 2 ;;
    --plain-ingest) [ $# -ge 2 ] || die "--plain-ingest needs a value"; PLAIN_INGEST="$2"; shift 2 ;;
    --docker) USE_DOCKER="yes"; shift ;;
    --no-docker) USE_DOCKER="no"; shift ;;
    --image) [ $# -ge 2 ] || die "--image needs a value"; IMAGE="$2"; shift 2 ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a value"; PREFIX="$2"; shift 2 ;;
    --root) [ $# -ge 2 ] || die "--root needs a value"; ROOT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; LAMBDA_ARGS+=("$@"); break ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

case "$MODE" in
  server|lambda|all) ;;
  "") usage >&2; die "--mode is required" ;;
  *) die "--mode must be server, lambda or all, not '$MODE'" ;;
esac
if [ -z "$ROLE" ]; then
  if [ "$MODE" = all ]; then ROLE=gateway; else ROLE=all; fi
fi
case "$ROLE" in all|gateway|processor) ;; *) die "--role must be all, gateway or processor" ;; esac
case "$ARCHITECTURE" in x86_64|arm64) ;; *) die "--architecture must be x86_64 or arm64" ;; esac
ROOT="${ROOT%/}"

# Every step goes through here: printed, and run unless this is a dry run.
step() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [ "$DRY_RUN" -eq 0 ]; then
    "$@"
  fi
}

note() {
  echo "== $*"
}

docker_engine() {
  command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1
}

project_python() {
  if [ -x "$REPO/.venv/bin/python" ]; then
    echo "$REPO/.venv/bin/python"
  else
    command -v python3.11 || command -v python3 || die "no python3 found"
  fi
}

# The AWS side needs boto3 and sense_gateway itself; make's venv has both.
ensure_project_venv() {
  if [ ! -x "$REPO/.venv/bin/python" ]; then
    local base
    base=$(command -v python3.11 || command -v python3) || die "no python3 found"
    step "$base" -m venv "$REPO/.venv"
    step "$REPO/.venv/bin/pip" install --quiet --config-settings editable_mode=compat -e "$REPO"
  fi
}

# The gateways' settings, from the stack's outputs (written by the lambda step).
GATEWAY_ENV=""

deploy_lambda() {
  note "lambda: package, artifact bucket, then the CloudFormation stack through a change set"
  ensure_project_venv
  local python package scratch="" aws_args=()
  python=$(project_python)
  package="$PACKAGE"
  [ -n "$ENDPOINT_URL" ] && aws_args+=(--endpoint-url "$ENDPOINT_URL")
  [ -n "$PROFILE" ] && aws_args+=(--profile "$PROFILE")
  step "$python" -m sense_gateway.aws.package --architecture "$ARCHITECTURE" --output "$package"
  if [ "$DRY_RUN" -eq 1 ] && [ -x "$REPO/.venv/bin/python" ]; then
    # Built aside: its digest names the code's key in the change set.
    scratch=$(mktemp -d)
    "$python" -m sense_gateway.aws.package --quiet --architecture "$ARCHITECTURE" \
      --output "$scratch/package.zip" >/dev/null
    package="$scratch/package.zip"
  fi
  GATEWAY_ENV=$(mktemp)
  trap 'rm -f "$GATEWAY_ENV"' EXIT
  local deploy=("$python" -m sense_gateway.aws.deploy --package "$package" --name "$NAME"
                --architecture "$ARCHITECTURE" --template "$REPO/etc/aws/sense-gateway.yaml"
                --region "$REGION" --gateway-env "$GATEWAY_ENV" "${aws_args[@]}" "${LAMBDA_ARGS[@]}")
  if [ "$DRY_RUN" -eq 1 ]; then
    deploy+=(--dry-run)
  fi
  printf '+'
  printf ' %q' "${deploy[@]}"
  printf '\n'
  if [ "$DRY_RUN" -eq 1 ] && ! "$python" -c 'import boto3, sense_gateway' >/dev/null 2>&1; then
    echo "   (dry run: not asked, $python has no boto3 or sense_gateway yet)"
  else
    # Runs in a dry run too: the change set is made, printed and deleted.
    "${deploy[@]}"
  fi
  if [ -n "$scratch" ]; then
    rm -rf "$scratch"
  fi
}

# Settings for a gateway sending to the stack's queue (mode all).
gateway_environment() {
  if [ "$MODE" = all ]; then
    if [ -s "$GATEWAY_ENV" ]; then
      cat "$GATEWAY_ENV"
    else
      echo "SENSE_QUEUE_BACKEND=sqs"
      echo "SENSE_AWS_REGION=$REGION"
    fi
  fi
}

deploy_server_docker() {
  note "server: container image $IMAGE, role $ROLE, CoAP on UDP 5683 and CoAPS on 5684 (host network: IPv6 and IPv4)"
  # Safe by default: plain CoAP ingests nothing (docs/security.md, migrating a fleet).
  local run_args=(-d --name "$CONTAINER" --restart unless-stopped --network host
                  --volume sense-gateway-data:/var/lib/sense-gateway --env "SENSE_ROLE=$ROLE"
                  --env "SENSE_SECURITY_PLAIN_INGEST=$PLAIN_INGEST")
  local variable
  while IFS= read -r variable; do
    [ -n "$variable" ] && run_args+=(--env "$variable")
  done < <(gateway_environment)
  step docker build --tag "$IMAGE" "$REPO"
  if [ "$DRY_RUN" -eq 1 ] || docker container inspect "$CONTAINER" >/dev/null 2>&1; then
    step docker rm --force "$CONTAINER"
  fi
  step docker run "${run_args[@]}" "$IMAGE"
}

deploy_server_systemd() {
  note "server: no Docker engine; venv in $ROOT$PREFIX and the systemd unit, role $ROLE"
  local python unit="$ROOT/etc/systemd/system/sense-gateway.service"
  python=$(command -v python3.11 || command -v python3) || die "no python3 found"
  if [ -z "$ROOT" ]; then
    if ! id sense-gateway >/dev/null 2>&1; then
      step useradd --system --user-group --home-dir /var/lib/sense-gateway \
        --shell /usr/sbin/nologin sense-gateway
    fi
  fi
  step "$python" -m venv "$ROOT$PREFIX"
  step "$ROOT$PREFIX/bin/pip" install --quiet --upgrade "$REPO"
  step install -d -m 0755 "$ROOT/etc/sense-gateway"
  if [ ! -e "$ROOT/etc/sense-gateway/sense-gateway.toml" ]; then
    step install -m 0644 "$REPO/etc/sense-gateway.toml" "$ROOT/etc/sense-gateway/sense-gateway.toml"
  fi
  local environment_file="$ROOT/etc/sense-gateway/environment"
  printf '+ write %q: SENSE_ROLE=%s SENSE_SECURITY_PLAIN_INGEST=%s %s\n' "$environment_file" \
    "$ROLE" "$PLAIN_INGEST" "$(gateway_environment | tr '\n' ' ')"
  if [ "$DRY_RUN" -eq 0 ]; then
    { echo "SENSE_ROLE=$ROLE"; echo "SENSE_SECURITY_PLAIN_INGEST=$PLAIN_INGEST"
      gateway_environment; } > "$environment_file"
  fi
  step install -d -m 0755 "$ROOT/etc/systemd/system"
  printf '+ install %q as %q (venv %s)\n' "$REPO/etc/systemd/sense-gateway.service" "$unit" "$PREFIX"
  if [ "$DRY_RUN" -eq 0 ]; then
    sed "s|/opt/sense-gateway|$PREFIX|g" "$REPO/etc/systemd/sense-gateway.service" > "$unit"
    chmod 0644 "$unit"
  fi
  if [ -z "$ROOT" ]; then
    step systemctl daemon-reload
    step systemctl enable sense-gateway.service
    step systemctl restart sense-gateway.service
  fi
}

deploy_server() {
  case "$USE_DOCKER" in
    yes) deploy_server_docker ;;
    no) deploy_server_systemd ;;
    auto) if docker_engine; then deploy_server_docker; else deploy_server_systemd; fi ;;
  esac
}

deploy_compose() {
  note "all: InfluxDB and Grafana from compose.yaml"
  if [ "$USE_DOCKER" = no ] || { [ "$USE_DOCKER" = auto ] && ! docker_engine; }; then
    echo "deploy.sh: no Docker engine: start InfluxDB 2.x and Grafana yourself (docs/deploy.md)" >&2
    return 0
  fi
  step docker compose --file "$REPO/compose.yaml" up --detach influxdb grafana
}

case "$MODE" in
  server) deploy_server ;;
  lambda) deploy_lambda ;;
  all) deploy_lambda; deploy_server; deploy_compose ;;
esac

if [ "$DRY_RUN" -eq 1 ]; then
  note "dry run: nothing was changed"
fi
