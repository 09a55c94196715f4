"""A compact JSON Schema of the KubeRay v1 CRD fields (and the Kubernetes core fields inside them)
that cluster/ uses, with their types. Every object is closed (additionalProperties: false), so a
misspelled or invented field fails validation, as `kubectl apply` with the real CRDs would.
Field names and enums follow ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,rayservices}.yaml."""

STR, INT, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
STR_MAP = {"type": "object", "additionalProperties": STR}


def obj(required: list[str] | None = None, **props) -> dict:
    return {"type": "object", "properties": props, "required": required or [], "additionalProperties": False}


def arr(item: dict) -> dict:
    return {"type": "array", "items": item}


ENV_VAR = obj(
    ["name"], name=STR, value=STR, valueFrom=obj(secretKeyRef=obj(["name", "key"], name=STR, key=STR, optional=BOOL))
)
CONTAINER = obj(
    ["name", "image"],
    name=STR,
    image=STR,
    env=arr(ENV_VAR),
    command=arr(STR),
    args=arr(STR),
    resources=obj(limits=STR_MAP, requests=STR_MAP),
    volumeMounts=arr(obj(["name", "mountPath"], name=STR, mountPath=STR, readOnly=BOOL)),
    ports=arr(obj(["containerPort"], containerPort=INT, name=STR, protocol=STR)),
)
VOLUME = obj(
    ["name"],
    name=STR,
    persistentVolumeClaim=obj(["claimName"], claimName=STR, readOnly=BOOL),
    emptyDir=obj(medium=STR, sizeLimit=STR),
)
TOLERATION = obj(
    key=STR,
    operator={"enum": ["Exists", "Equal"]},
    value=STR,
    effect={"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
)
POD_TEMPLATE = obj(
    ["spec"],
    metadata=obj(labels=STR_MAP, annotations=STR_MAP),
    spec=obj(
        ["containers"],
        containers=arr(CONTAINER),
        volumes=arr(VOLUME),
        tolerations=arr(TOLERATION),
        nodeSelector=STR_MAP,
        serviceAccountName=STR,
    ),
)
RAY_CLUSTER_SPEC = obj(
    ["headGroupSpec"],
    rayVersion=STR,
    enableInTreeAutoscaling=BOOL,
    suspend=BOOL,
    autoscalerOptions=obj(
        upscalingMode={"enum": ["Default", "Aggressive", "Conservative"]},
        idleTimeoutSeconds=INT,
        image=STR,
        imagePullPolicy=STR,
        env=arr(ENV_VAR),
        resources=obj(limits=STR_MAP, requests=STR_MAP),
    ),
    headGroupSpec=obj(["template"], rayStartParams=STR_MAP, template=POD_TEMPLATE, serviceType=STR, enableIngress=BOOL),
    workerGroupSpecs=arr(
        obj(
            ["groupName", "template"],
            groupName=STR,
            replicas=INT,
            minReplicas=INT,
            maxReplicas=INT,
            numOfHosts=INT,
            rayStartParams=STR_MAP,
            template=POD_TEMPLATE,
            suspend=BOOL,
        )
    ),
)
METADATA = obj(["name"], name=STR, namespace=STR, labels=STR_MAP, annotations=STR_MAP)


def resource(kind: str, spec: dict, api: str = "ray.io/v1") -> dict:
    return obj(
        ["apiVersion", "kind", "metadata", "spec"],
        apiVersion={"const": api},
        kind={"const": kind},
        metadata=METADATA,
        spec=spec,
    )


SCHEMAS = {
    "RayCluster": resource("RayCluster", RAY_CLUSTER_SPEC),
    "RayJob": resource(
        "RayJob",
        obj(
            ["entrypoint"],
            entrypoint=STR,
            runtimeEnvYAML=STR,
            jobId=STR,
            submissionMode={"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
            shutdownAfterJobFinishes=BOOL,
            ttlSecondsAfterFinished=INT,
            activeDeadlineSeconds=INT,
            backoffLimit=INT,
            entrypointNumCpus={"type": "number"},
            entrypointNumGpus={"type": "number"},
            suspend=BOOL,
            rayClusterSpec=RAY_CLUSTER_SPEC,
            clusterSelector=STR_MAP,
        ),
    ),
    "RayService": resource(
        "RayService",
        obj(
            ["serveConfigV2", "rayClusterConfig"],
            serveConfigV2=STR,
            rayClusterConfig=RAY_CLUSTER_SPEC,
            upgradeStrategy=obj(type={"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]}),
            excludeHeadPodFromServeSvc=BOOL,
        ),
    ),
    "PersistentVolumeClaim": resource(
        "PersistentVolumeClaim",
        obj(
            ["accessModes", "resources"],
            storageClassName=STR,
            accessModes=arr({"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}),
            resources=obj(["requests"], requests=obj(["storage"], storage=STR)),
        ),
        api="v1",
    ),
    "Kustomization": {
        **obj(
            ["apiVersion", "kind", "resources"],
            apiVersion={"const": "kustomize.config.k8s.io/v1beta1"},
            kind={"const": "Kustomization"},
            resources=arr(STR),
            labels=arr(obj(pairs=STR_MAP, includeSelectors=BOOL)),
        )
    },
}
