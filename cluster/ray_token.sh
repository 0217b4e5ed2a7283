#!/usr/bin/env bash
# This user's Ray token, made when there is none; prints where it is. Every node and every driver of a Ray
# cluster with token authentication (cluster/ray_head.sh's default) holds the same one.
#   cluster/ray_token.sh            # on the head (ray_head.sh and ray_slurm.sbatch run it), or before `ray up`
# Ray reads the token from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token; this
# makes the last, readable by its owner only (600): whoever reads it can run code on the cluster. Copy it, same
# path and mode, to every node that does not share this home directory.
set -euo pipefail
if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
  echo "RAY_AUTH_TOKEN"
  exit 0
fi
if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
  if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    echo "error: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is not a file holding a token: copy the cluster's token" \
         "there, or unset RAY_AUTH_TOKEN_PATH to use ~/.ray/auth_token (made if missing)" >&2
    exit 2
  fi
  echo "$RAY_AUTH_TOKEN_PATH"
  exit 0
fi
token="$HOME/.ray/auth_token"
if [ ! -s "$token" ]; then
  (umask 077 && mkdir -p "$HOME/.ray" && ray get-auth-token --generate > /dev/null 2>&1)
  [ -s "$token" ] || { echo "error: could not make a Ray token at $token (ray get-auth-token --generate)" >&2; exit 2; }
  echo "made a Ray token: $token (copy it, mode 600, to every node that does not share this home)" >&2
fi
if [ -n "$(find "$token" -perm /077)" ]; then
  chmod 600 "$token"
  echo "made $token readable by its owner only (600): whoever reads it can run code on the cluster" >&2
fi
echo "$token"
